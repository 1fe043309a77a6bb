//! Token buckets, sans-I/O: per-caller rate limits at the callee, and the retry budget at the
//! caller.

use std::time::Instant;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    stamp: Instant,
}

impl TokenBucket {
    /// A full bucket. A rate that is not a number, or below 0, refills nothing: a policy made in
    /// code (the parser refuses such rates) fails closed, where a NaN rate would keep the bucket
    /// full.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate: refill_rate(rate),
            burst: burst.max(1.0),
            tokens: burst.max(1.0),
            stamp: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The tokens the bucket holds at `now`.
    fn level(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        (self.tokens + elapsed * self.rate).min(self.burst)
    }

    fn refill(&mut self, now: Instant) {
        self.tokens = self.level(now);
        self.stamp = now;
    }

    /// Whether the bucket is full at `now`: it is then the same as a new one.
    pub fn is_full(&self, now: Instant) -> bool {
        self.level(now) >= self.burst
    }

    /// Takes a new rate and burst from `now` on (a policy changed the limit): what was saved up
    /// until now stays, up to the new burst.
    pub fn retune(&mut self, rate: f64, burst: f64, now: Instant) {
        let (rate, burst) = (refill_rate(rate), burst.max(1.0));
        if rate != self.rate || burst != self.burst {
            self.refill(now);
            self.rate = rate;
            self.burst = burst;
            self.tokens = self.tokens.min(burst);
        }
    }
}

/// `rate`, or 0 for a rate that is not a number or is below 0. A bucket that refills nothing is
/// never full again, so a limiter under such a rate keeps a bucket for every caller it saw (the
/// callers are mesh identities): dropping one would give its caller a new burst.
fn refill_rate(rate: f64) -> f64 {
    rate.max(0.0)
}

/// One rate limit's buckets, one per caller. A bucket that has refilled is the same as a new one,
/// so those are dropped once the table doubles: it holds the callers that called within about
/// `burst / rate` seconds, not every caller ever seen (a gateway's cloud principals are
/// unbounded).
#[derive(Debug, Clone)]
pub struct RateLimiter<K> {
    buckets: crate::FastMap<K, TokenBucket>,
    /// The table's size that makes the next insertion drop the full buckets.
    sweep_at: usize,
}

impl<K> Default for RateLimiter<K> {
    fn default() -> Self {
        RateLimiter {
            buckets: crate::FastMap::default(),
            sweep_at: MIN_SWEEP,
        }
    }
}

/// The smallest table of buckets that is swept.
const MIN_SWEEP: usize = 64;

impl<K: std::hash::Hash + Eq + Clone> RateLimiter<K> {
    /// Takes a token from `caller`'s bucket (`rate` a second, `burst` saved up; a bucket made
    /// under other figures takes these).
    pub fn take(&mut self, caller: &K, rate: f64, burst: f64, now: Instant) -> bool {
        if let Some(bucket) = self.buckets.get_mut(caller) {
            bucket.retune(rate, burst, now);
            return bucket.take(now);
        }
        if self.buckets.len() >= self.sweep_at {
            self.buckets.retain(|_, b| !b.is_full(now));
            self.sweep_at = (self.buckets.len() * 2).max(MIN_SWEEP);
            // The table's room shrinks with it after a crowd has gone.
            if self.buckets.capacity() > 2 * self.sweep_at {
                self.buckets.shrink_to(self.sweep_at);
            }
        }
        let mut bucket = TokenBucket::new(rate, burst, now);
        let taken = bucket.take(now);
        self.buckets.insert(caller.clone(), bucket);
        taken
    }

    /// Callers with a bucket.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no caller has a bucket.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// A retry budget: retries may add at most `ratio` of the normal load, plus a small `reserve` so
/// a quiet caller can still retry. Each call deposits `ratio`; each retry withdraws one.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryBudget {
    ratio: f64,
    balance: f64,
    cap: f64,
    retries: u64,
    calls: u64,
}

impl RetryBudget {
    /// A budget of `ratio` (0.2 = retries add at most 20%) with `reserve` retries up front.
    pub fn new(ratio: f64, reserve: f64) -> Self {
        RetryBudget {
            ratio,
            balance: reserve,
            cap: reserve.max(1.0) * 10.0 + 100.0,
            retries: 0,
            calls: 0,
        }
    }

    /// A call was made (not a retry).
    pub fn deposit(&mut self) {
        self.calls += 1;
        self.balance = (self.balance + self.ratio).min(self.cap);
    }

    /// Whether a retry may be made now; if so it is counted.
    pub fn withdraw(&mut self) -> bool {
        if self.balance >= 1.0 {
            self.balance -= 1.0;
            self.retries += 1;
            true
        } else {
            false
        }
    }

    /// Calls and retries so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.calls, self.retries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_its_rate_up_to_its_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 2.0, t0);
        assert!(b.take(t0) && b.take(t0));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert!(!b.take(t0 + Duration::from_millis(150)));
        let later = t0 + Duration::from_secs(60);
        assert!(
            b.take(later) && b.take(later) && !b.take(later),
            "burst caps the savings"
        );
    }

    #[test]
    fn a_rate_that_is_not_a_number_refills_nothing() {
        let t0 = Instant::now();
        for rate in [f64::NAN, -1.0, f64::NEG_INFINITY] {
            let mut b = TokenBucket::new(rate, 2.0, t0);
            assert!(b.take(t0) && b.take(t0), "the burst, at {rate}");
            assert!(!b.take(t0 + Duration::from_secs(60)), "a refill at {rate}");
            // Nor does a limit changed to such a rate.
            let mut limiter = RateLimiter::default();
            assert!(limiter.take(&1, 1.0, 1.0, t0));
            let later = t0 + Duration::from_secs(1);
            assert!(
                limiter.take(&1, rate, 1.0, later),
                "refilled before the change"
            );
            assert!(!limiter.take(&1, rate, 1.0, later + Duration::from_secs(60)));
        }
        // A bucket that spent a minute under a negative rate owes nothing when the rate is
        // mended: it refills from where it was.
        let mut b = TokenBucket::new(-1.0, 1.0, t0);
        assert!(b.take(t0));
        let later = t0 + Duration::from_secs(60);
        b.retune(1.0, 1.0, later);
        assert!(b.take(later + Duration::from_secs(1)));
    }

    #[test]
    fn a_limiter_keeps_the_callers_that_called_lately_not_every_caller() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::default();
        // 10,000 callers, one call each, a millisecond apart; 1 a second, burst 2: a bucket is
        // full again a second after its call.
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_millis(u64::from(i));
            assert!(limiter.take(&i, 1.0, 2.0, now), "caller {i}");
        }
        // Only the callers of about the last second (and those since the last sweep) are kept.
        assert!(limiter.len() < 2_500, "{} buckets kept", limiter.len());
        // A caller that is still limited keeps its bucket through sweeps: its empty bucket is not
        // forgotten (which would give it a full one).
        let mut limiter = RateLimiter::default();
        assert!(limiter.take(&u32::MAX, 0.001, 1.0, t0));
        assert!(!limiter.take(&u32::MAX, 0.001, 1.0, t0));
        for i in 0..1_000u32 {
            limiter.take(&i, 1.0, 1.0, t0 + Duration::from_secs(10));
        }
        assert!(!limiter.take(&u32::MAX, 0.001, 1.0, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn a_changed_limit_applies_to_buckets_made_before() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::default();
        for _ in 0..10 {
            assert!(limiter.take(&"a", 100.0, 10.0, t0));
        }
        // The policy lowers the burst to 1 and the rate to 1 a second: nothing more now, one a
        // second later.
        assert!(!limiter.take(&"a", 1.0, 1.0, t0));
        assert!(!limiter.take(&"a", 1.0, 1.0, t0 + Duration::from_millis(500)));
        assert!(limiter.take(&"a", 1.0, 1.0, t0 + Duration::from_millis(1_000)));
        // Raised again: the bucket fills at the new rate from then on.
        assert!(!limiter.take(&"a", 100.0, 10.0, t0 + Duration::from_millis(1_100)));
        assert!(limiter.take(&"a", 100.0, 10.0, t0 + Duration::from_millis(1_120)));
    }

    #[test]
    fn retries_stay_within_the_ratio() {
        let mut budget = RetryBudget::new(0.2, 5.0);
        let mut retried = 0;
        for _ in 0..1000 {
            budget.deposit();
            // Every call fails and wants a retry.
            if budget.withdraw() {
                retried += 1;
            }
        }
        assert!(retried <= 200 + 5, "{retried} retries");
        assert!(retried >= 195, "{retried} retries");
        assert_eq!(budget.totals(), (1000, retried));
    }
}
