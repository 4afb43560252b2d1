//! What both adapters share of the [`Inbox`](domain::ports::Inbox) port: the checking and
//! sorting of what callers hand in and get back.

use domain::ports::{Claim, Completion, FailureRecord, Outcome, Requested, Retry, TraceParent};
use domain::{ObjectId, StoreError, StoredObject, Timestamp};

/// What one `enqueue` writes: the ids ascending and each once, and the trace context of
/// each (all `None` while traces are off, so the adapters can skip the column).
///
/// Ascending, so that concurrent enqueues lock shared rows in the same order and wait for
/// each other instead of deadlocking; each once, because an id named twice in one
/// statement would be an error on PostgreSQL and a double bump on SQLite.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Enqueue {
    pub(crate) ids: Vec<i64>,
    /// Parallel to `ids`; empty when no request carries a trace context.
    pub(crate) traces: Vec<Option<String>>,
}

impl Enqueue {
    pub(crate) fn new(requests: &[Requested]) -> Self {
        let mut sorted: Vec<&Requested> = requests.iter().collect();
        // Stable: of an id named twice, the first request is kept.
        sorted.sort_by_key(|request| request.id);
        sorted.dedup_by_key(|request| request.id);
        let ids = sorted.iter().map(|request| request.id.get()).collect();
        let traces = if sorted.iter().any(|request| request.trace.is_some()) {
            sorted
                .iter()
                .map(|request| request.trace.as_ref().map(|t| t.as_str().to_owned()))
                .collect()
        } else {
            Vec::new()
        };
        Self { ids, traces }
    }
}

/// What one `complete` call writes, split by table; claims and objects sorted by id.
#[derive(Debug, Default)]
pub(crate) struct Settlement {
    /// The objects reported online, to upsert.
    pub(crate) online: Vec<StoredObject>,
    /// The failures to record, in the order they were handed in.
    pub(crate) failures: Vec<FailureRecord>,
    /// Every claim as `(id, generation)`, ascending by id.
    pub(crate) claims: Vec<(i64, i64)>,
    /// The claims whose fetch failed transiently, ascending by id.
    pub(crate) retries: Vec<RetryRow>,
}

/// One id handed back for a later attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RetryRow {
    pub(crate) id: i64,
    /// When it is claimable again.
    pub(crate) at: Timestamp,
    /// The cause, as `last_error` keeps it: `code: reason`.
    pub(crate) error: String,
}

impl RetryRow {
    fn new(id: i64, retry: &Retry) -> Self {
        Self {
            id,
            at: retry.at,
            error: format!("{}: {}", retry.code, retry.reason),
        }
    }
}

impl Settlement {
    /// Splits `done`; refuses an id named twice or an online object that is not the
    /// claimed id, which would be a caller's bug the database must not half-apply.
    pub(crate) fn new(done: &[Completion]) -> Result<Self, StoreError> {
        let mut settlement = Self::default();
        for completion in done {
            let id = completion.claim.id;
            match &completion.outcome {
                Outcome::Online(object) if object.id != id => {
                    return Err(StoreError::Query(format!(
                        "completion of id {} carries object {}",
                        id.get(),
                        object.id.get()
                    )));
                }
                Outcome::Online(object) => settlement.online.push(*object),
                Outcome::Offline => {}
                Outcome::Retry(retry) => settlement.retries.push(RetryRow::new(id.get(), retry)),
                Outcome::Failed(record) => settlement.failures.push(record.clone()),
            }
            settlement
                .claims
                .push((id.get(), completion.claim.generation));
        }
        settlement.claims.sort_unstable();
        if let Some(pair) = settlement
            .claims
            .windows(2)
            .find(|pair| pair[0].0 == pair[1].0)
        {
            return Err(StoreError::Query(format!(
                "completion names id {} more than once",
                pair[0].0
            )));
        }
        settlement.online.sort_unstable_by_key(|object| object.id);
        settlement.retries.sort_unstable_by_key(|retry| retry.id);
        Ok(settlement)
    }

    /// Whether there is nothing to write.
    pub(crate) fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }
}

/// What becomes of the claimed rows still held, by [`split_settled`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Split<'a> {
    /// Rows that go: their outcome serves every request they count.
    pub(crate) settled: Vec<i64>,
    /// Rows requested again since their claim: fetched once more, after the refetch delay.
    pub(crate) again: Vec<i64>,
    /// Rows whose fetch failed transiently: handed back for their next attempt.
    pub(crate) retried: Vec<&'a RetryRow>,
}

/// Splits the claimed ids still in the inbox and held by the completing owner, given as
/// `current` `(id, generation)` rows: those that failed transiently wait for a retry,
/// whatever their generation; of the others, those whose generation is still the claimed
/// one are settled (the row goes), and the rest were requested again since and must be
/// fetched once more (the lease is freed).
///
/// Claimed ids absent from `current` were settled already (by another instance whose
/// lease overlapped, or by an earlier call), or are held by another instance now: nothing
/// is left to do for them.
pub(crate) fn split_settled<'a>(settlement: &'a Settlement, current: &[(i64, i64)]) -> Split<'a> {
    let claims = &settlement.claims;
    let retries = &settlement.retries;
    let mut split = Split {
        settled: Vec::with_capacity(current.len()),
        ..Split::default()
    };
    for &(id, generation) in current {
        let Ok(at) = claims.binary_search_by_key(&id, |claim| claim.0) else {
            continue;
        };
        if let Ok(retry) = retries.binary_search_by_key(&id, |retry| retry.id) {
            split.retried.push(&retries[retry]);
        } else if claims[at].1 == generation {
            split.settled.push(id);
        } else {
            split.again.push(id);
        }
    }
    split
}

/// One claimed row: `(id, generation, requested_at, trace, attempts)`.
pub(crate) type ClaimedRow<T> = (i64, i64, T, Option<String>, i32);

/// Claimed rows as [`Claim`]s, longest-waiting first (ties by id), whatever order the
/// database returned them in. A stored trace context that is no longer valid is dropped:
/// the fetch then starts a trace of its own.
pub(crate) fn claims_in_order(
    mut rows: Vec<ClaimedRow<Timestamp>>,
) -> Result<Vec<Claim>, StoreError> {
    rows.sort_unstable_by(|a, b| a.2.cmp(&b.2).then(a.0.cmp(&b.0)));
    rows.into_iter()
        .map(|(id, generation, requested_at, trace, attempts)| {
            Ok(Claim {
                id: stored_id(id)?,
                generation,
                trace: trace.as_deref().and_then(TraceParent::new),
                attempts: stored_count(attempts),
                requested_at,
            })
        })
        .collect()
}

/// A count read back from an `integer` column (never negative when written by us).
pub(crate) fn stored_count(raw: i32) -> u32 {
    u32::try_from(raw).unwrap_or(0)
}

/// A count as an `integer` column keeps it, saturating.
pub(crate) fn count_column(count: u32) -> i32 {
    i32::try_from(count).unwrap_or(i32::MAX)
}

/// The distinct ids of `records`, ascending: what a replay enqueues.
pub(crate) fn distinct_ids(mut ids: Vec<i64>) -> Vec<i64> {
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// An id read back from the database.
pub(crate) fn stored_id(raw: i64) -> Result<ObjectId, StoreError> {
    ObjectId::new(raw).map_err(|err| StoreError::Query(format!("stored object id {raw}: {err}")))
}

/// A `usize` limit as SQL's `LIMIT`, saturating.
pub(crate) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(raw: i64) -> ObjectId {
        ObjectId::new(raw).expect("non-negative")
    }

    fn at(micros: i64) -> Timestamp {
        Timestamp::from_unix_micros(micros)
    }

    fn claim(raw: i64, generation: i64) -> Claim {
        Claim {
            id: id(raw),
            generation,
            trace: None,
            attempts: 0,
            requested_at: at(0),
        }
    }

    fn retry(raw: i64, generation: i64, next: i64) -> Completion {
        Completion {
            claim: claim(raw, generation),
            outcome: Outcome::Retry(Retry {
                at: at(next),
                code: "timeout".into(),
                reason: "slow".into(),
            }),
        }
    }

    fn offline(raw: i64, generation: i64) -> Completion {
        Completion {
            claim: claim(raw, generation),
            outcome: Outcome::Offline,
        }
    }

    fn requested(raw: &[i64]) -> Vec<Requested> {
        raw.iter().map(|&r| Requested::untraced(id(r))).collect()
    }

    #[test]
    fn ids_are_sorted_and_named_once_without_traces_when_none_is_given() {
        let enqueue = Enqueue::new(&requested(&[5, 1, 5, 0]));
        assert_eq!(enqueue.ids, [0, 1, 5]);
        assert!(enqueue.traces.is_empty());
        assert_eq!(Enqueue::new(&[]), Enqueue::default());
    }

    #[test]
    fn traces_follow_their_ids_and_the_first_request_of_an_id_wins() {
        let trace = |text: &str| TraceParent::new(text);
        let enqueue = Enqueue::new(&[
            Requested {
                id: id(9),
                trace: trace("t9"),
            },
            Requested::untraced(id(2)),
            Requested {
                id: id(9),
                trace: trace("later"),
            },
        ]);
        assert_eq!(enqueue.ids, [2, 9]);
        assert_eq!(enqueue.traces, [None, Some("t9".to_owned())]);
    }

    #[test]
    fn a_settlement_splits_the_outcomes_and_sorts_the_claims() {
        let object = StoredObject {
            id: id(3),
            last_seen: Timestamp::from_unix_micros(1),
            expires_at: Timestamp::from_unix_micros(2),
        };
        let failure = FailureRecord {
            id: id(1),
            code: "timeout".into(),
            reason: "slow".into(),
            at: Timestamp::from_unix_micros(3),
            attempts: 4,
        };
        let settlement = Settlement::new(&[
            Completion {
                claim: claim(3, 2),
                outcome: Outcome::Online(object),
            },
            Completion {
                claim: claim(2, 1),
                outcome: Outcome::Offline,
            },
            Completion {
                claim: claim(1, 7),
                outcome: Outcome::Failed(failure.clone()),
            },
            retry(9, 1, 50),
            retry(4, 1, 40),
        ])
        .expect("valid");
        assert_eq!(settlement.online, [object]);
        assert_eq!(settlement.failures, [failure]);
        assert_eq!(settlement.claims, [(1, 7), (2, 1), (3, 2), (4, 1), (9, 1)]);
        let retried: Vec<(i64, Timestamp, &str)> = settlement
            .retries
            .iter()
            .map(|r| (r.id, r.at, r.error.as_str()))
            .collect();
        assert_eq!(
            retried,
            [(4, at(40), "timeout: slow"), (9, at(50), "timeout: slow")]
        );
        assert!(!settlement.is_empty());
        assert!(Settlement::new(&[]).expect("empty").is_empty());
    }

    #[test]
    fn an_id_named_twice_or_a_foreign_object_is_refused() {
        let twice = Settlement::new(&[
            Completion {
                claim: claim(4, 1),
                outcome: Outcome::Offline,
            },
            Completion {
                claim: claim(4, 2),
                outcome: Outcome::Offline,
            },
        ]);
        assert!(matches!(twice, Err(StoreError::Query(m)) if m.contains("id 4")));

        let foreign = Settlement::new(&[Completion {
            claim: claim(4, 1),
            outcome: Outcome::Online(StoredObject {
                id: id(5),
                last_seen: Timestamp::from_unix_micros(1),
                expires_at: Timestamp::from_unix_micros(2),
            }),
        }]);
        assert!(matches!(foreign, Err(StoreError::Query(_))));
    }

    #[test]
    fn claimed_rows_split_by_generation_and_retries_wait_whatever_theirs() {
        let settlement = Settlement::new(&[
            offline(1, 1),
            offline(2, 1),
            offline(3, 4),
            offline(9, 1),
            retry(6, 1, 10),
            retry(7, 1, 20),
            retry(8, 1, 30),
        ])
        .expect("valid");
        // 1 unchanged, 2 requested again, 3 unchanged, 9 gone; 5 was never claimed; 6
        // failed transiently, 7 too and was requested again, 8 is held by someone else.
        let current = [(1, 1), (2, 2), (3, 4), (5, 1), (6, 1), (7, 3)];
        let split = split_settled(&settlement, &current);
        assert_eq!((split.settled, split.again), (vec![1, 3], vec![2]));
        let retried: Vec<i64> = split.retried.iter().map(|r| r.id).collect();
        assert_eq!(retried, [6, 7]);
    }

    #[test]
    fn claims_come_longest_waiting_first() {
        let claims = claims_in_order(vec![
            (7, 1, at(30), None, 0),
            (5, 2, at(10), Some("00-trace".to_owned()), 3),
            (6, 1, at(10), Some("not\nprintable".to_owned()), 0),
        ])
        .expect("valid");
        let traced = Claim {
            trace: TraceParent::new("00-trace"),
            attempts: 3,
            requested_at: at(10),
            ..claim(5, 2)
        };
        let waited = |raw, since| Claim {
            requested_at: at(since),
            ..claim(raw, 1)
        };
        assert_eq!(claims, [traced, waited(6, 10), waited(7, 30)]);
        assert!(claims_in_order(vec![(-1, 1, at(0), None, 0)]).is_err());
    }
}
