//! Wall-clock instants as the store keeps them, and the clock port's production adapter.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ports::Clock;

/// A wall-clock instant with microsecond precision (microseconds since the Unix epoch).
///
/// Microseconds are what PostgreSQL's `timestamptz` keeps, so a value survives a round
/// trip through every store unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// Builds an instant from microseconds since the Unix epoch.
    pub const fn from_unix_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_unix_micros(self) -> i64 {
        self.0
    }

    /// Converts a [`SystemTime`], truncating to microseconds.
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }

    /// This instant plus `d`, saturating at the end of time.
    pub fn saturating_add(self, d: Duration) -> Self {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(micros))
    }

    /// This instant minus `d`, saturating at the start of time.
    pub fn saturating_sub(self, d: Duration) -> Self {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_sub(micros))
    }

    /// How long from `earlier` until this instant; zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        let micros = self.0.saturating_sub(earlier.0);
        Duration::from_micros(u64::try_from(micros).unwrap_or(0))
    }
}

/// The clock of the running service: the operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_unix_micros(1_000);
        assert_eq!(
            t.saturating_add(Duration::from_millis(2)).as_unix_micros(),
            3_000
        );
        assert_eq!(
            Timestamp::from_unix_micros(i64::MAX - 1).saturating_add(Duration::from_secs(1)),
            Timestamp::from_unix_micros(i64::MAX)
        );
        assert_eq!(
            t.saturating_duration_since(Timestamp::from_unix_micros(400)),
            Duration::from_micros(600)
        );
        assert_eq!(
            t.saturating_duration_since(Timestamp::from_unix_micros(5_000)),
            Duration::ZERO
        );
    }
}
