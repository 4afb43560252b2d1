//! When a transiently failed fetch is tried again: exponential backoff with full jitter,
//! capped, within a horizon counted from the id's first request.
//!
//! The schedule lives in the inbox, not in a task: a failed id is handed back unleased,
//! claimable from its next attempt's time, so an outage of hours costs no memory, survives
//! restarts and is shared by every instance. Only past the horizon (or on a permanent
//! error) does an id become a dead letter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::time::Timestamp;

/// The durable retry schedule of transiently failed fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The longest pause before the first retry; the bound doubles with each failed attempt.
    pub first_delay: Duration,
    /// The longest pause between two attempts, however many failed.
    pub max_delay: Duration,
    /// How long after its first request an id keeps being retried; a transient failure
    /// after that makes it a dead letter.
    pub horizon: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(5 * 60),
            horizon: Duration::from_secs(24 * 60 * 60),
        }
    }
}

impl RetryPolicy {
    /// The longest pause after `failed` failed attempts (at least 1):
    /// `first_delay · 2^(failed − 1)`, capped at `max_delay`.
    pub fn ceiling(&self, failed: u32) -> Duration {
        let doublings = failed.saturating_sub(1).min(31);
        self.first_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay)
    }

    /// When to try an id again after its `failed`-th failed attempt at `now`, if at all: a
    /// pause of `unit` (in `[0, 1)`, drawn at random: full jitter) times
    /// [`ceiling`](Self::ceiling), never past the horizon. `None` once the horizon counted
    /// from `requested_at` has passed: the id is then a dead letter.
    pub fn next_attempt(
        &self,
        failed: u32,
        requested_at: Timestamp,
        now: Timestamp,
        unit: f64,
    ) -> Option<Timestamp> {
        let give_up_at = requested_at.saturating_add(self.horizon);
        if now >= give_up_at {
            return None;
        }
        let pause = self.ceiling(failed).mul_f64(unit.clamp(0.0, 1.0));
        Some(now.saturating_add(pause).min(give_up_at))
    }
}

/// Random numbers for the jitter: SplitMix64 over one atomic word, so every fetch task
/// draws from it without a lock. Not for cryptography; seeded per instance, so instances
/// that restart together do not retry in step.
#[derive(Debug)]
pub struct Jitter(AtomicU64);

impl Jitter {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(AtomicU64::new(seed))
    }

    /// The next number, uniform in `[0, 1)`.
    pub fn unit(&self) -> f64 {
        const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut z = self
            .0
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // The top 53 bits as a fraction: every value is exactly representable.
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            horizon: Duration::from_secs(3600),
        }
    }

    #[test]
    fn the_ceiling_doubles_from_the_first_delay_up_to_the_cap() {
        let p = policy();
        let ceilings: Vec<u64> = (1..=8).map(|n| p.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.ceiling(0), Duration::from_secs(1));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn the_next_attempt_is_jittered_below_the_ceiling_and_never_past_the_horizon() {
        let p = policy();
        let start = Timestamp::from_unix_micros(1_000_000_000);
        let now = start.saturating_add(Duration::from_secs(10));
        assert_eq!(p.next_attempt(4, start, now, 0.0), Some(now));
        assert_eq!(
            p.next_attempt(4, start, now, 0.5),
            Some(now.saturating_add(Duration::from_secs(4)))
        );
        // Close to the horizon: the last attempt is at the horizon itself.
        let late = start.saturating_add(Duration::from_secs(3590));
        assert_eq!(
            p.next_attempt(20, start, late, 0.99),
            Some(start.saturating_add(p.horizon))
        );
        // At or past the horizon: give up.
        let gone = start.saturating_add(p.horizon);
        assert_eq!(p.next_attempt(21, start, gone, 0.0), None);
    }

    #[test]
    fn jitter_is_uniform_enough_and_differs_by_seed() {
        let jitter = Jitter::new(7);
        let draws: Vec<f64> = (0..10_000).map(|_| jitter.unit()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((0.45..0.55).contains(&mean), "mean {mean}");
        let below_tenth = draws.iter().filter(|u| **u < 0.1).count();
        assert!((800..1200).contains(&below_tenth), "{below_tenth}");
        assert_ne!(Jitter::new(1).unit(), Jitter::new(2).unit());
    }
}
