//! Exponential back-off with jitter, for re-dialling peers and the gateway. The caller supplies
//! the randomness, so tests are exact.

use std::time::Duration;

/// Delays that double from `min` up to `max`, each scaled by a jitter factor in `[0.5, 1.0)`, so
/// a fleet that lost its gateway at once does not come back at once.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A back-off between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The next delay; `random` is any value, its low bits pick the jitter.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // Jitter in [0.5, 1.0): never below half the base, never above it.
        let frac = 0.5 + (random % 1000) as f64 / 2000.0;
        base.mul_f64(frac)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_with_jitter_below_base() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.next_delay(0), Duration::from_millis(50));
        assert_eq!(b.next_delay(0), Duration::from_millis(100));
        assert_eq!(b.next_delay(0), Duration::from_millis(200));
        for _ in 0..10 {
            let d = b.next_delay(999);
            assert!(
                d < Duration::from_secs(1) && d >= Duration::from_millis(500),
                "{d:?}"
            );
        }
        b.reset();
        assert_eq!(b.next_delay(0), Duration::from_millis(50));
    }
}
