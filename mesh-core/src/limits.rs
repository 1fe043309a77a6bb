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
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst: burst.max(1.0),
            tokens: burst.max(1.0),
            stamp: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.stamp = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
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
