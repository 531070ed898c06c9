//! The retry policy: exponential backoff and when an event goes dead.
//!
//! Pure decisions, shared by every backend. The delay is computed here and applied by
//! SQL as `now() + delay` on the database clock, never as an instant from the app's
//! clock.

use std::time::Duration;

/// Exponential backoff: `base * 2^(failures-1)`, capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure (default 1 s).
    pub base: Duration,
    /// The largest delay (default 5 min).
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
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
/// before this one; `max_retries` how many retries the event may have after its first
/// attempt (so `max_retries = 0` means dead at the first failure).
pub fn decide(attempts_before: i32, max_retries: i32, backoff: &Backoff) -> Decision {
    let failures = attempts_before.max(0) as u32 + 1;
    if failures > max_retries.max(0) as u32 {
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
        assert_eq!(b.delay(9), Duration::from_secs(256));
        assert_eq!(b.delay(10), Duration::from_secs(300));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn dead_after_max_retries() {
        let b = Backoff::default();
        assert_eq!(decide(0, 0, &b), Decision::Dead);
        assert_eq!(
            decide(0, 2, &b),
            Decision::RetryAfter(Duration::from_secs(1))
        );
        assert_eq!(
            decide(1, 2, &b),
            Decision::RetryAfter(Duration::from_secs(2))
        );
        assert_eq!(decide(2, 2, &b), Decision::Dead);
        assert_eq!(
            decide(-5, 1, &b),
            Decision::RetryAfter(Duration::from_secs(1))
        );
    }
}
