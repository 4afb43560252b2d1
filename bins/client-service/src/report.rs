//! The one line printed per emitter round: what was sent, what the service answered, and
//! what it had stored when checked.
//!
//! The line is `key=value` pairs separated by single spaces, always in this order:
//!
//! ```text
//! round=3 sent=117 distinct=68 even=35 status=202 accepted=68 latency_ms=2.1 stored_even=35/35 stored_odd=0
//! round=4 sent=12 distinct=12 even=5 status=error error="timed out" accepted=? latency_ms=1000.4 stored_even=? stored_odd=?
//! ```
//!
//! - `sent`: ids in the callback, duplicates included; `distinct`, `even`: distinct ids and
//!   the even ones among them (the ones the upstream reports online).
//! - `status`: the HTTP status of the POST, or `error` followed by `error="…"` when no
//!   answer came (timeout, refused connection, …).
//! - `accepted`: the count the service's answer says it accepted, `?` when it says none.
//! - `latency_ms`: from sending the POST until its answer was read, one decimal.
//! - `stored_even=F/E`: of the `E` distinct even ids sent, `F` were in the service's
//!   `GET /objects` when checked; `stored_odd`: odd ids sent that were stored (expected 0).
//!   Both are `?` when the check failed.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

/// How the POST of one callback went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostOutcome {
    /// The service answered.
    Answered {
        /// The HTTP status.
        status: u16,
        /// How many ids the answer says were accepted, if it says.
        accepted: Option<u64>,
    },
    /// No answer came.
    Failed {
        /// Why, short: `timed out`, `connection failed: …`.
        error: String,
    },
}

/// The report of one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundReport {
    /// The round, from 1.
    pub round: u64,
    /// Ids sent, duplicates included.
    pub sent: usize,
    /// Distinct ids sent.
    pub distinct: usize,
    /// Distinct even ids sent.
    pub even: usize,
    /// What the POST got.
    pub post: PostOutcome,
    /// From sending the POST until its answer (or failure).
    pub latency: Duration,
    /// Distinct even ids sent that were stored when checked; `None` if the check failed.
    pub stored_even: Option<usize>,
    /// Distinct odd ids sent that were stored when checked; `None` if the check failed.
    pub stored_odd: Option<usize>,
}

impl RoundReport {
    /// Builds the report of round `round`, which sent `ids`; `stored` is what the service
    /// held when checked, `None` when the check failed.
    pub fn new(
        round: u64,
        ids: &[u64],
        post: PostOutcome,
        latency: Duration,
        stored: Option<&HashSet<u64>>,
    ) -> Self {
        let distinct: HashSet<u64> = ids.iter().copied().collect();
        let is_even = |id: &&u64| id.is_multiple_of(2);
        let count_stored = |even: bool| {
            stored.map(|stored| {
                distinct
                    .iter()
                    .filter(|id| is_even(id) == even && stored.contains(id))
                    .count()
            })
        };
        Self {
            round,
            sent: ids.len(),
            distinct: distinct.len(),
            even: distinct.iter().filter(is_even).count(),
            post,
            latency,
            stored_even: count_stored(true),
            stored_odd: count_stored(false),
        }
    }
}

impl fmt::Display for RoundReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "round={} sent={} distinct={} even={} ",
            self.round, self.sent, self.distinct, self.even
        )?;
        match &self.post {
            PostOutcome::Answered { status, accepted } => {
                write!(f, "status={status} accepted=")?;
                match accepted {
                    Some(accepted) => write!(f, "{accepted}")?,
                    None => f.write_str("?")?,
                }
            }
            PostOutcome::Failed { error } => write!(f, "status=error error={error:?} accepted=?")?,
        }
        write!(f, " latency_ms={:.1}", self.latency.as_secs_f64() * 1000.0)?;
        match (self.stored_even, self.stored_odd) {
            (Some(even), Some(odd)) => {
                write!(f, " stored_even={even}/{} stored_odd={odd}", self.even)
            }
            _ => f.write_str(" stored_even=? stored_odd=?"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_distinct_and_even_ids_and_what_was_stored() {
        let ids = [4, 4, 7, 0, 9, 2, 7, 8];
        let stored: HashSet<u64> = [0, 2, 4, 9, 50].into_iter().collect();
        let report = RoundReport::new(
            3,
            &ids,
            PostOutcome::Answered {
                status: 202,
                accepted: Some(6),
            },
            Duration::from_micros(2_140),
            Some(&stored),
        );
        assert_eq!(report.sent, 8);
        assert_eq!(report.distinct, 6);
        assert_eq!(report.even, 4);
        assert_eq!(report.stored_even, Some(3), "8 was not stored");
        assert_eq!(report.stored_odd, Some(1), "9 was stored");
        assert_eq!(
            report.to_string(),
            "round=3 sent=8 distinct=6 even=4 status=202 accepted=6 latency_ms=2.1 stored_even=3/4 stored_odd=1"
        );
    }

    #[test]
    fn a_failed_post_and_a_failed_check_are_marked() {
        let report = RoundReport::new(
            4,
            &[1, 2],
            PostOutcome::Failed {
                error: "timed out".into(),
            },
            Duration::from_millis(1000),
            None,
        );
        assert_eq!(
            report.to_string(),
            r#"round=4 sent=2 distinct=2 even=1 status=error error="timed out" accepted=? latency_ms=1000.0 stored_even=? stored_odd=?"#
        );
    }

    #[test]
    fn an_error_status_without_a_count_and_quotes_in_errors_stay_parsable() {
        let report = RoundReport::new(
            1,
            &[6],
            PostOutcome::Answered {
                status: 503,
                accepted: None,
            },
            Duration::ZERO,
            Some(&HashSet::new()),
        );
        assert_eq!(
            report.to_string(),
            "round=1 sent=1 distinct=1 even=1 status=503 accepted=? latency_ms=0.0 stored_even=0/1 stored_odd=0"
        );
        let report = RoundReport::new(
            2,
            &[],
            PostOutcome::Failed {
                error: r#"said "no""#.into(),
            },
            Duration::ZERO,
            None,
        );
        assert!(
            report.to_string().contains(r#"error="said \"no\"""#),
            "{report}"
        );
    }
}
