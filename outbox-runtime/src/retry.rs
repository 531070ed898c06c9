//! The retry policy: exponential backoff and when an event goes dead.
//!
//! Pure decisions, shared by every backend. The delay is computed here and applied by
//! SQL as `now() + delay` on the database clock, never as an instant from the app's
//! clock.

use std::time::Duration;

/// Exponential backoff: `base * 2^(failures-1)`, capped.
///
/// The default is the design's schedule: 1 s after the first failure, doubling, capped
/// at 32 s, so the gaps are 1, 2, 4, 8, 16 s and then 32 s for the 6th and every later
/// failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure (default 1 s).
    pub base: Duration,
    /// The largest delay (default 32 s).
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(32),
        }
    }
}

impl Backoff {
    /// The delay after the `failures`-th consecutive failure (1-based): `base`,
    /// `2*base`, `4*base`, ... up to `cap`.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(32);
        let factor = 1u64 << exp;
        let nanos = self.base.as_nanos().saturating_mul(u128::from(factor));
        let cap = self.cap.as_nanos();
        Duration::from_nanos(nanos.min(cap).min(u128::from(u64::MAX)) as u64)
    }
}

/// What to do with an event after a handler failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Pending again, due after the delay.
    RetryAfter(Duration),
    /// Dead: the retries are used up.
    Dead,
}

/// Decides after a transient failure. `attempts_before` is the row's failure count
/// before this one; `max_retries` is the design's "max retry": the event is dead when
/// its failure count reaches it, so `max_retries = 20` gives 20 attempts in all (0 and 1
/// both mean one attempt).
pub fn decide(attempts_before: i32, max_retries: i32, backoff: &Backoff) -> Decision {
    let failures = attempts_before.max(0) as u32 + 1;
    if failures >= max_retries.max(1) as u32 {
        Decision::Dead
    } else {
        Decision::RetryAfter(backoff.delay(failures))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_one_second_and_caps() {
        let b = Backoff::default();
        assert_eq!(b.delay(1), Duration::from_secs(1));
        assert_eq!(b.delay(2), Duration::from_secs(2));
        assert_eq!(b.delay(3), Duration::from_secs(4));
        assert_eq!(b.delay(4), Duration::from_secs(8));
        assert_eq!(b.delay(5), Duration::from_secs(16));
        assert_eq!(b.delay(6), Duration::from_secs(32));
        assert_eq!(b.delay(7), Duration::from_secs(32));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(32));
    }

    #[test]
    fn the_default_schedule_is_twenty_attempts() {
        let b = Backoff::default();
        let mut gaps = Vec::new();
        let mut attempts = 0;
        while let Decision::RetryAfter(d) = decide(attempts, 20, &b) {
            gaps.push(d.as_secs());
            attempts += 1;
        }
        // Dead at the 20th failure: 19 gaps between 20 attempts.
        assert_eq!(attempts + 1, 20);
        assert_eq!(&gaps[..7], &[1, 2, 4, 8, 16, 32, 32]);
        assert_eq!(gaps.len(), 19);
        // 1 + 2 + 4 + 8 + 16 + 14 * 32 = 479 s of backoff before the 20th attempt.
        assert_eq!(gaps.iter().sum::<u64>(), 479);
    }

    #[test]
    fn dead_when_the_failures_reach_max_retries() {
        let b = Backoff::default();
        assert_eq!(decide(0, 0, &b), Decision::Dead);
        assert_eq!(decide(0, 1, &b), Decision::Dead);
        assert_eq!(
            decide(0, 3, &b),
            Decision::RetryAfter(Duration::from_secs(1))
        );
        assert_eq!(
            decide(1, 3, &b),
            Decision::RetryAfter(Duration::from_secs(2))
        );
        assert_eq!(decide(2, 3, &b), Decision::Dead);
        assert_eq!(
            decide(-5, 2, &b),
            Decision::RetryAfter(Duration::from_secs(1))
        );
    }
}
