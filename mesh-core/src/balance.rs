//! Load balancing and circuit breaking, sans-I/O.
//!
//! - **Power of two choices over peak-EWMA**: two healthy candidates are drawn at random and the
//!   one with the lower cost (latency estimate x (calls in flight + 1)) takes the call. The latency
//!   estimate jumps to any slower sample at once (the peak) and decays towards faster ones over
//!   `decay`, so a replica that slows down loses traffic immediately and wins it back gradually.
//! - **Locality**: candidates in the caller's zone are preferred while any of them is healthy;
//!   only when none is does traffic fail over to other zones.
//! - **Circuit breaking**: `failures` consecutive failures eject an endpoint for a back-off that
//!   doubles with each ejection (up to `max_eject`); when it runs out one probe call is let
//!   through: success closes the breaker, failure ejects again for longer.
//! - **Concurrency limit**: an endpoint with `max_in_flight` calls is skipped.
//! - **Panic mode**: when every candidate is ejected, calls go to them all anyway (as Envoy does):
//!   a service whose only replicas are flaky keeps most of its calls rather than losing all.

use std::hash::Hash;
use std::time::{Duration, Instant};

/// Balancer and breaker settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceConfig {
    /// Consecutive failures that eject an endpoint.
    pub failures: u32,
    /// First ejection time; doubles with each further ejection.
    pub base_eject: Duration,
    /// Longest ejection.
    pub max_eject: Duration,
    /// How fast the latency estimate forgets a slow sample.
    pub decay: Duration,
    /// Calls in flight per endpoint.
    pub max_in_flight: u32,
    /// Prefer endpoints in the caller's zone.
    pub prefer_zone: bool,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            failures: 5,
            base_eject: Duration::from_secs(1),
            max_eject: Duration::from_secs(30),
            decay: Duration::from_secs(2),
            max_in_flight: 1000,
            prefer_zone: true,
        }
    }
}

#[derive(Debug, Clone)]
struct State {
    ewma_us: f64,
    stamp: Option<Instant>,
    in_flight: u32,
    failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    probing: bool,
}

impl Default for State {
    fn default() -> Self {
        State {
            ewma_us: 0.0,
            stamp: None,
            in_flight: 0,
            failures: 0,
            ejections: 0,
            ejected_until: None,
            probing: false,
        }
    }
}

/// What a finished call did to its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing changed.
    None,
    /// The endpoint was ejected until then.
    Ejected(Instant),
    /// A probe succeeded: the endpoint is back.
    Restored,
}

/// Per-endpoint state of one service's endpoints, keyed by `K`.
#[derive(Debug, Clone)]
pub struct Balancer<K> {
    config: BalanceConfig,
    states: crate::FastMap<K, State>,
}

impl<K: Clone + Eq + Hash> Balancer<K> {
    /// A balancer with `config`.
    pub fn new(config: BalanceConfig) -> Self {
        Balancer {
            config,
            states: crate::FastMap::default(),
        }
    }

    /// Replaces the settings (a new policy); endpoint state is kept.
    pub fn set_config(&mut self, config: &BalanceConfig) {
        if self.config != *config {
            self.config = config.clone();
        }
    }

    /// Picks an endpoint among `candidates` (each with its zone), for a caller in `zone`, at
    /// `now`; `r1`, `r2` are random numbers. `None` if every candidate is ejected or full.
    pub fn pick(
        &mut self,
        candidates: &[(K, Option<&str>)],
        zone: Option<&str>,
        now: Instant,
        r1: u64,
        r2: u64,
    ) -> Option<K> {
        let chosen = match candidates {
            // One endpoint (the common case on a small site): no choice to make, nothing to
            // allocate.
            [(k, _)] => {
                let usable = self.available(k, now)
                    || self
                        .states
                        .get(k)
                        .is_none_or(|s| s.in_flight < self.config.max_in_flight);
                if !usable {
                    return None;
                }
                k.clone()
            }
            _ => self.choose(candidates, zone, now, r1, r2)?,
        };
        let state = self.states.entry(chosen.clone()).or_default();
        if state.ejected_until.is_some_and(|until| now >= until) {
            // The ejection ran out: this call is the probe.
            state.probing = true;
            state.ejected_until = None;
        }
        state.in_flight += 1;
        Some(chosen)
    }

    /// Two random choices among the healthy candidates (in `zone` when preferred), the one with
    /// the lower cost.
    fn choose(
        &self,
        candidates: &[(K, Option<&str>)],
        zone: Option<&str>,
        now: Instant,
        r1: u64,
        r2: u64,
    ) -> Option<K> {
        let mut healthy: Vec<&(K, Option<&str>)> = candidates
            .iter()
            .filter(|(k, _)| self.available(k, now))
            .collect();
        if healthy.is_empty() {
            healthy = candidates
                .iter()
                .filter(|(k, _)| {
                    self.states
                        .get(k)
                        .is_none_or(|s| s.in_flight < self.config.max_in_flight)
                })
                .collect();
        }
        let local: Vec<&(K, Option<&str>)> = match zone {
            Some(z) if self.config.prefer_zone => healthy
                .iter()
                .copied()
                .filter(|(_, ez)| *ez == Some(z))
                .collect(),
            _ => Vec::new(),
        };
        let pool = if local.is_empty() { healthy } else { local };
        Some(match pool.len() {
            0 => return None,
            1 => pool[0].0.clone(),
            n => {
                let a = (r1 % n as u64) as usize;
                let mut b = (r2 % (n as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                let (ka, kb) = (&pool[a].0, &pool[b].0);
                if self.cost(kb, now) < self.cost(ka, now) {
                    kb.clone()
                } else {
                    ka.clone()
                }
            }
        })
    }

    fn available(&self, k: &K, now: Instant) -> bool {
        match self.states.get(k) {
            None => true,
            Some(s) => {
                s.in_flight < self.config.max_in_flight
                    && !s.probing
                    && s.ejected_until.is_none_or(|until| now >= until)
            }
        }
    }

    /// The estimate decays towards zero while no sample arrives, so an endpoint that was slow once
    /// (a cold start) is tried again rather than shunned for good.
    fn cost(&self, k: &K, now: Instant) -> f64 {
        self.states.get(k).map_or(0.0, |s| {
            let idle = s
                .stamp
                .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
            let decayed = s.ewma_us * (-idle / self.config.decay.as_secs_f64().max(1e-6)).exp();
            decayed * f64::from(s.in_flight + 1)
        })
    }

    /// Gives back the slot of a call to `k` that ended with no outcome to learn from (its caller
    /// gave up on it before any answer).
    pub fn cancel(&mut self, k: &K) {
        if let Some(state) = self.states.get_mut(k) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }

    /// Records the end of a call to `k` picked by [`Balancer::pick`].
    pub fn finish(&mut self, k: &K, latency: Duration, ok: bool, now: Instant) -> Outcome {
        let config = self.config.clone();
        let state = self.states.entry(k.clone()).or_default();
        state.in_flight = state.in_flight.saturating_sub(1);
        let sample = latency.as_secs_f64() * 1e6;
        state.ewma_us = match state.stamp {
            None => sample,
            Some(_) if sample > state.ewma_us => sample,
            Some(stamp) => {
                let elapsed = now.saturating_duration_since(stamp).as_secs_f64();
                let w = (-elapsed / config.decay.as_secs_f64().max(1e-6)).exp();
                state.ewma_us * w + sample * (1.0 - w)
            }
        };
        state.stamp = Some(now);
        if ok {
            state.failures = 0;
            if state.probing {
                // The breaker closes: what it measured while sick says nothing about it now.
                state.probing = false;
                state.ejections = 0;
                state.ewma_us = sample;
                return Outcome::Restored;
            }
            return Outcome::None;
        }
        state.failures += 1;
        if state.probing || state.failures >= config.failures {
            state.probing = false;
            state.failures = 0;
            state.ejections += 1;
            let backoff = config
                .base_eject
                .saturating_mul(1 << (state.ejections - 1).min(16))
                .min(config.max_eject);
            let until = now + backoff;
            state.ejected_until = Some(until);
            return Outcome::Ejected(until);
        }
        Outcome::None
    }

    /// Forgets an endpoint that left.
    pub fn remove(&mut self, k: &K) {
        self.states.remove(k);
    }

    /// Whether `k` is ejected at `now`.
    pub fn is_ejected(&self, k: &K, now: Instant) -> bool {
        self.states
            .get(k)
            .is_some_and(|s| s.ejected_until.is_some_and(|until| now < until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn a_cancelled_call_gives_its_slot_back_and_teaches_nothing() {
        let t0 = Instant::now();
        let mut b: Balancer<u32> = Balancer::new(BalanceConfig {
            max_in_flight: 1,
            ..BalanceConfig::default()
        });
        let one = [1u32];
        let candidates = || one.iter().map(|k| (*k, None::<&str>)).collect::<Vec<_>>();
        assert_eq!(b.pick(&candidates(), None, t0, 1, 2), Some(1));
        assert_eq!(
            b.pick(&candidates(), None, t0, 1, 2),
            None,
            "the slot is taken"
        );
        b.cancel(&1);
        assert_eq!(
            b.pick(&candidates(), None, t0, 1, 2),
            Some(1),
            "the slot came back"
        );
    }

    #[test]
    fn a_slow_replica_gets_little_traffic() {
        let mut b = Balancer::new(BalanceConfig::default());
        let eps = [("fast", None), ("slow", None)];
        let mut now = Instant::now();
        let mut seed = 7;
        let mut slow = 0;
        for _ in 0..1000 {
            let k = b
                .pick(&eps, None, now, lcg(&mut seed), lcg(&mut seed))
                .expect("pick");
            let latency = if k == "slow" { 10 * MS } else { MS };
            now += latency;
            b.finish(&k, latency, true, now);
            slow += usize::from(k == "slow");
        }
        assert!(slow < 200, "slow replica got {slow} of 1000");
    }

    #[test]
    fn a_replica_slow_once_is_tried_again() {
        let mut b = Balancer::new(BalanceConfig::default());
        let eps = [("a", None), ("b", None)];
        let mut now = Instant::now();
        // a's first call was slow (a cold start); b is steadily at 10 ms; a is really at 1 ms.
        b.pick(&eps, None, now, 0, 0);
        b.finish(&"a", 50 * MS, true, now);
        let mut to_a = 0;
        for i in 0..2000u64 {
            let k = b.pick(&eps, None, now, i, i + 1).expect("pick");
            let latency = if k == "a" { MS } else { 10 * MS };
            now += latency;
            b.finish(&k, latency, true, now);
            to_a += usize::from(k == "a");
        }
        assert!(
            to_a > 1500,
            "the fast replica got {to_a} of 2000 after one slow call"
        );
    }

    #[test]
    fn consecutive_failures_eject_with_growing_backoff_then_a_probe_restores() {
        let mut b = Balancer::new(BalanceConfig {
            failures: 3,
            ..BalanceConfig::default()
        });
        let eps = [("bad", None)];
        let t0 = Instant::now();
        for i in 0..3 {
            let k = b.pick(&eps, None, t0, 0, 0).expect("pick");
            let out = b.finish(&k, MS, false, t0);
            assert_eq!(out == Outcome::None, i < 2);
        }
        assert!(b.is_ejected(&"bad", t0));
        // Alone and ejected, it still takes calls (panic mode); beside a healthy one, it does not.
        let both = [("bad", None), ("good", None)];
        for r in 0..20 {
            let k = b.pick(&both, None, t0 + 500 * MS, r, r + 1).expect("pick");
            assert_eq!(k, "good");
            b.finish(&k, MS, true, t0 + 500 * MS);
        }
        // After one second a single probe goes through; it fails: ejected for two seconds.
        let t1 = t0 + 1000 * MS;
        assert_eq!(b.pick(&eps, None, t1, 0, 0), Some("bad"));
        for r in 0..10 {
            assert_eq!(
                b.pick(&both, None, t1, r, r + 1),
                Some("good"),
                "only one probe at a time"
            );
            b.finish(&"good", MS, true, t1);
        }
        assert_eq!(
            b.finish(&"bad", MS, false, t1),
            Outcome::Ejected(t1 + 2000 * MS)
        );
        let t2 = t1 + 2000 * MS;
        assert_eq!(b.pick(&eps, None, t2, 0, 0), Some("bad"));
        assert_eq!(b.finish(&"bad", MS, true, t2), Outcome::Restored);
        assert_eq!(b.pick(&eps, None, t2, 0, 0), Some("bad"));
    }

    #[test]
    fn the_callers_zone_wins_while_it_has_a_healthy_endpoint() {
        let mut b = Balancer::new(BalanceConfig {
            failures: 1,
            ..BalanceConfig::default()
        });
        let eps = [("a1", Some("A")), ("b1", Some("B")), ("b2", Some("B"))];
        let now = Instant::now();
        for seed in 0..50 {
            let k = b
                .pick(&eps, Some("A"), now, seed, seed * 7 + 1)
                .expect("pick");
            assert_eq!(k, "a1");
            b.finish(&k, MS, true, now);
        }
        let k = b.pick(&eps, Some("A"), now, 0, 1).expect("pick");
        b.finish(&k, MS, false, now);
        for seed in 0..50 {
            let k = b
                .pick(&eps, Some("A"), now, seed, seed * 3 + 1)
                .expect("pick");
            assert_ne!(k, "a1", "ejected endpoint picked");
            b.finish(&k, MS, true, now);
        }
    }

    #[test]
    fn full_endpoints_are_skipped() {
        let mut b = Balancer::new(BalanceConfig {
            max_in_flight: 1,
            ..BalanceConfig::default()
        });
        let eps = [("x", None)];
        let now = Instant::now();
        assert_eq!(b.pick(&eps, None, now, 0, 0), Some("x"));
        assert_eq!(b.pick(&eps, None, now, 0, 0), None);
        b.finish(&"x", MS, true, now);
        assert_eq!(b.pick(&eps, None, now, 0, 0), Some("x"));
    }
}
