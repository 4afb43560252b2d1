//! A small request rate limiter: a virtual schedule of evenly spaced slots (GCRA with no
//! burst allowance).
//!
//! Each request takes the next free slot, at the earliest now; slots are `1/rate` apart,
//! so over any stretch of time the requests sent never outnumber `rate` per second (plus
//! the one sent at the very start of the stretch). There is deliberately no burst:
//! after an idle spell the next request goes at once, but the ones after it are spaced
//! again, which is what an upstream that counts our requests per second wants to see.
//!
//! The schedule is kept in virtual time, not in wake-up times: a timer that fires a
//! little late (tokio's has millisecond granularity) does not push later slots back, so
//! the average rate stays exact under load. A request whose wait is cancelled (its fetch
//! dropped) leaves its slot unused: the limiter errs towards fewer requests, never more.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Spaces requests so that at most `per_second` are sent per second; 0 = no limit.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// The distance between two slots; `None` when unlimited.
    interval: Option<Duration>,
    /// The earliest time the next slot may be taken.
    next_free: Mutex<Instant>,
    /// Counts the acquisitions that had to wait for their slot.
    waited: ::metrics::Counter,
}

impl RateLimiter {
    /// A limiter of `per_second` requests per second (0 = unlimited) that counts the
    /// acquisitions that had to wait in `waited`.
    pub(crate) fn new(per_second: u32, waited: ::metrics::Counter) -> Self {
        // Rounded up, so rounding never lets a request through early.
        let interval = (per_second > 0)
            .then(|| Duration::from_nanos(1_000_000_000u64.div_ceil(u64::from(per_second))));
        Self {
            interval,
            next_free: Mutex::new(Instant::now()),
            waited,
        }
    }

    /// Waits for the next free slot.
    pub(crate) async fn acquire(&self) {
        self.acquire_by(None).await;
    }

    /// Waits for the next free slot, unless that slot is later than `latest`: then it
    /// returns `false` at once and reserves nothing.
    pub(crate) async fn acquire_by(&self, latest: Option<Instant>) -> bool {
        if self.interval.is_none() {
            return true;
        }
        let now = Instant::now();
        let Some(slot) = self.reserve(now, latest) else {
            return false;
        };
        if slot > now {
            self.waited.increment(1);
            tokio::time::sleep_until(slot).await;
        }
        true
    }

    /// Takes the next free slot at or after `now`, unless it is later than `latest`.
    fn reserve(&self, now: Instant, latest: Option<Instant>) -> Option<Instant> {
        let Some(interval) = self.interval else {
            return Some(now);
        };
        // The guarded value is one Instant, always valid: a panic elsewhere cannot leave
        // it half-written.
        let mut next_free = self
            .next_free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let slot = (*next_free).max(now);
        if latest.is_some_and(|latest| slot > latest) {
            return None;
        }
        *next_free = slot + interval;
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn limiter(per_second: u32) -> RateLimiter {
        RateLimiter::new(per_second, ::metrics::Counter::noop())
    }

    /// `actual` is within one slot (`interval`) of `expected`.
    fn assert_about(actual: Duration, expected: Duration, interval: Duration) {
        assert!(
            actual + interval >= expected && actual <= expected + interval,
            "took {actual:?}, expected {expected:?} ± {interval:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn n_acquisitions_at_rate_r_take_n_minus_one_over_r() {
        for (rate, n) in [(10u32, 20u32), (3, 10), (1000, 500), (1, 3)] {
            let limiter = limiter(rate);
            let started = Instant::now();
            for _ in 0..n {
                limiter.acquire().await;
            }
            let interval = Duration::from_secs(1) / rate;
            assert_about(started.elapsed(), interval * (n - 1), interval);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_acquisition_and_one_after_an_idle_spell_do_not_wait() {
        let limiter = limiter(10);
        let started = Instant::now();
        limiter.acquire().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        limiter.acquire().await;
        assert_eq!(started.elapsed(), 100 * MS);
        // Idle for a while: no burst is saved up, the next goes at once, the one after
        // it a slot later.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let resumed = Instant::now();
        limiter.acquire().await;
        assert_eq!(resumed.elapsed(), Duration::ZERO);
        limiter.acquire().await;
        assert_eq!(resumed.elapsed(), 100 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_is_unlimited_and_never_waits() {
        let limiter = limiter(0);
        let started = Instant::now();
        for _ in 0..10_000 {
            limiter.acquire().await;
        }
        assert!(limiter.acquire_by(Some(started)).await);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_acquirers_share_the_rate() {
        let rate = 20u32;
        let (tasks, each) = (5u32, 4u32);
        let limiter = Arc::new(limiter(rate));
        let started = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let limiter = limiter.clone();
            handles.push(tokio::spawn(async move {
                let mut times = Vec::new();
                for _ in 0..each {
                    limiter.acquire().await;
                    times.push(started.elapsed());
                }
                times
            }));
        }
        let mut times = Vec::new();
        for handle in handles {
            times.extend(handle.await.unwrap());
        }
        times.sort();
        let interval = Duration::from_secs(1) / rate;
        let n = tasks * each;
        assert_eq!(times.len(), n as usize);
        // Together they took the time of one acquirer doing all of it...
        assert_about(started.elapsed(), interval * (n - 1), interval);
        // ...and no two were granted less than a slot apart.
        for (i, at) in times.iter().enumerate() {
            assert!(*at >= interval * i as u32, "acquisition {i} at {at:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_past_the_latest_is_refused_at_once_and_not_taken() {
        let limiter = limiter(2);
        let started = Instant::now();
        assert!(limiter.acquire_by(Some(started)).await);
        // The next slot is at 500 ms: past a latest of 400 ms, so no wait and no slot.
        assert!(!limiter.acquire_by(Some(started + 400 * MS)).await);
        assert_eq!(started.elapsed(), Duration::ZERO);
        // The refused slot is still free for the next one.
        assert!(limiter.acquire_by(Some(started + 500 * MS)).await);
        assert_eq!(started.elapsed(), 500 * MS);
    }
}
