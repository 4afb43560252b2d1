//! A bound on how many lines one kind of fault may log per second (or per longer window).
//!
//! When the upstream goes down, every id fails the same way: thousands of identical lines a
//! second would bury everything else and cost more than the work. Each failure is still
//! counted (metrics) and recorded (the failures table); the log keeps the first few of each
//! second and says how many it left out.

use std::sync::Mutex;
use std::time::Duration;

use crate::time::Timestamp;

/// Admits at most `lines` events in each wall-clock window (a second unless built with
/// [`LogBudget::per_window`]).
#[derive(Debug)]
pub struct LogBudget {
    lines: u32,
    window_micros: i64,
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// The window (since the epoch, in windows) the counts are about.
    window: i64,
    /// Events admitted in that second.
    admitted: u32,
    /// Events left out since the last admitted one.
    suppressed: u64,
}

impl LogBudget {
    /// A budget of `per_second` lines a second.
    pub fn new(per_second: u32) -> Self {
        Self::per_window(per_second, Duration::from_secs(1))
    }

    /// A budget of `lines` lines per `window` (at least a microsecond).
    pub fn per_window(lines: u32, window: Duration) -> Self {
        Self {
            lines,
            window_micros: i64::try_from(window.as_micros()).unwrap_or(i64::MAX).max(1),
            state: Mutex::new(Window::default()),
        }
    }

    /// Whether an event at `now` may be logged: `Some(n)` with the number of events left
    /// out since the previous admitted one (to say so in the line), or `None` to skip it.
    pub fn admit(&self, now: Timestamp) -> Option<u64> {
        let current = now.as_unix_micros().div_euclid(self.window_micros);
        let mut window = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if window.window != current {
            window.window = current;
            window.admitted = 0;
        }
        if window.admitted < self.lines {
            window.admitted += 1;
            Some(std::mem::take(&mut window.suppressed))
        } else {
            window.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(micros: i64) -> Timestamp {
        Timestamp::from_unix_micros(1_700_000_000_000_000 + micros)
    }

    #[test]
    fn a_burst_logs_the_first_lines_of_each_second_and_then_says_how_many_it_left_out() {
        let budget = LogBudget::new(3);
        let admitted: Vec<Option<u64>> = (0..10).map(|i| budget.admit(at(i * 1_000))).collect();
        assert_eq!(&admitted[..3], [Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        // The next second: the first line reports the 7 left out.
        assert_eq!(budget.admit(at(1_000_000)), Some(7));
        assert_eq!(budget.admit(at(1_000_001)), Some(0));
    }

    #[test]
    fn a_longer_window_admits_its_lines_once_per_window() {
        let budget = LogBudget::per_window(1, Duration::from_secs(10));
        assert_eq!(budget.admit(at(0)), Some(0));
        assert_eq!(budget.admit(at(9_000_000)), None);
        assert_eq!(budget.admit(at(9_999_999)), None);
        assert_eq!(budget.admit(at(10_000_000)), Some(2));
    }

    #[test]
    fn a_quiet_service_logs_every_event() {
        let budget = LogBudget::new(1);
        for second in 0..5 {
            assert_eq!(budget.admit(at(second * 1_000_000)), Some(0));
        }
    }
}
