//! The inbox's multi-statement writes, each one blocking job in one immediate transaction
//! (see [`super::write`] for why they run whole on the blocking thread).

use diesel::prelude::*;
use diesel::sql_types::{Bool, Nullable, Text};
use diesel::sqlite::{Sqlite, SqliteConnection};
use diesel::upsert::excluded;
use domain::ports::{FailureFilter, FailureQuery, FailureRecord};

use super::schema::{fetch_failures, inbox};
use super::write::{self, Row};
use crate::inbox::{Enqueue, Settlement, count_column, distinct_ids, split_settled};

/// How many ids one statement carries: at most three bind variables each keeps a statement
/// at 30 000 variables, under SQLite's limit of 32 766.
pub(super) const MAX_IDS_PER_STATEMENT: usize = 10_000;

diesel::define_sql_function! {
    /// SQL's `coalesce(a, b)`: `a` unless it is NULL, then `b`.
    #[sql_name = "coalesce"]
    fn first_known(a: Nullable<Text>, b: Nullable<Text>) -> Nullable<Text>;
}

/// How many failures one `INSERT` carries: four bind variables each.
const MAX_FAILURES_PER_STATEMENT: usize = 5_000;

/// Records in one immediate transaction that each id of `enqueue` was requested at `at`:
/// new ids wait from `at` on, waiting ids get their generation bumped and take the new
/// trace context if there is one. Without trace contexts the column is not written.
pub(super) fn enqueue(conn: &mut SqliteConnection, enqueue: &Enqueue, at: i64) -> QueryResult<()> {
    durably(conn, |conn| enqueue_in_transaction(conn, enqueue, at))
}

/// Runs `write` in an immediate transaction committed with `synchronous = FULL` (the log
/// synced before the commit returns, so it survives power loss), then sets the
/// connection back to the session's `NORMAL`. Nothing is written if `FULL` cannot be set.
pub(super) fn durably<T>(
    conn: &mut SqliteConnection,
    write: impl FnOnce(&mut SqliteConnection) -> QueryResult<T>,
) -> QueryResult<T> {
    use diesel::connection::SimpleConnection as _;

    conn.batch_execute("PRAGMA synchronous = FULL;")?;
    let written = conn.immediate_transaction(write);
    let restored = conn.batch_execute("PRAGMA synchronous = NORMAL;");
    let written = written?;
    // A connection left on FULL is only slower; the write itself is done and durable.
    if let Err(err) = restored {
        tracing::debug!(error = %err, "cannot set synchronous back to NORMAL");
    }
    Ok(written)
}

fn enqueue_in_transaction(
    conn: &mut SqliteConnection,
    enqueue: &Enqueue,
    at: i64,
) -> QueryResult<()> {
    if enqueue.traces.is_empty() {
        for chunk in enqueue.ids.chunks(MAX_IDS_PER_STATEMENT) {
            let values: Vec<_> = chunk
                .iter()
                .map(|&id| (inbox::object_id.eq(id), inbox::requested_at.eq(at)))
                .collect();
            diesel::insert_into(inbox::table)
                .values(values)
                .on_conflict(inbox::object_id)
                .do_update()
                .set(inbox::generation.eq(inbox::generation + 1))
                .execute(conn)?;
        }
        return Ok(());
    }
    let ids = enqueue.ids.chunks(MAX_IDS_PER_STATEMENT);
    let traces = enqueue.traces.chunks(MAX_IDS_PER_STATEMENT);
    for (ids, traces) in ids.zip(traces) {
        let values: Vec<_> = ids
            .iter()
            .zip(traces)
            .map(|(&id, trace)| {
                (
                    inbox::object_id.eq(id),
                    inbox::requested_at.eq(at),
                    inbox::trace.eq(trace.as_deref()),
                )
            })
            .collect();
        diesel::insert_into(inbox::table)
            .values(values)
            .on_conflict(inbox::object_id)
            .do_update()
            .set((
                inbox::generation.eq(inbox::generation + 1),
                inbox::trace.eq(first_known(excluded(inbox::trace), inbox::trace)),
            ))
            .execute(conn)?;
    }
    Ok(())
}

/// One failure as `fetch_failures` stores it.
#[derive(Debug, Clone)]
pub(super) struct FailureRow {
    object_id: i64,
    code: String,
    reason: String,
    failed_at: i64,
    attempts: i32,
}

impl From<FailureRecord> for FailureRow {
    fn from(record: FailureRecord) -> Self {
        Self {
            object_id: record.id.get(),
            code: record.code,
            reason: record.reason,
            failed_at: record.at.as_unix_micros(),
            attempts: count_column(record.attempts),
        }
    }
}

/// Settles claims in one immediate transaction: upserts the online objects, records the
/// failures as dead letters, and settles the claimed rows still leased to `owner` (see
/// [`settle`]).
pub(super) fn complete(
    conn: &mut SqliteConnection,
    owner: &str,
    settlement: &Settlement,
    again_from: i64,
) -> QueryResult<()> {
    let online: Vec<Row> = settlement.online.iter().map(Row::from).collect();
    let failures: Vec<FailureRow> = settlement
        .failures
        .iter()
        .cloned()
        .map(FailureRow::from)
        .collect();
    conn.immediate_transaction(|conn| {
        write::upsert_rows(conn, &online)?;
        record_failures(conn, &failures)?;
        settle(conn, owner, settlement, again_from)
    })
}

/// Appends `failures`; dead letters are kept until replayed, purged or past retention.
fn record_failures(conn: &mut SqliteConnection, failures: &[FailureRow]) -> QueryResult<()> {
    for chunk in failures.chunks(MAX_FAILURES_PER_STATEMENT) {
        let values: Vec<_> = chunk
            .iter()
            .map(|failure| {
                (
                    fetch_failures::object_id.eq(failure.object_id),
                    fetch_failures::code.eq(&failure.code),
                    fetch_failures::reason.eq(&failure.reason),
                    fetch_failures::failed_at.eq(failure.failed_at),
                    fetch_failures::attempts.eq(failure.attempts),
                )
            })
            .collect();
        diesel::insert_into(fetch_failures::table)
            .values(values)
            .execute(conn)?;
    }
    Ok(())
}

/// Reads the generations of the claimed rows still leased to `owner`; hands the ones that
/// failed transiently back for their next attempt (no owner, `lease_until` = that
/// attempt's time, one more attempt counted, the cause kept); removes those whose
/// generation is unchanged and hands the others back, claimable from `again_from`. Rows
/// another instance has taken over are left alone.
fn settle(
    conn: &mut SqliteConnection,
    owner: &str,
    settlement: &Settlement,
    again_from: i64,
) -> QueryResult<()> {
    let mut current: Vec<(i64, i64)> = Vec::with_capacity(settlement.claims.len());
    for chunk in settlement.claims.chunks(MAX_IDS_PER_STATEMENT) {
        let ids: Vec<i64> = chunk.iter().map(|claim| claim.0).collect();
        current.extend(
            inbox::table
                .filter(inbox::object_id.eq_any(&ids))
                .filter(inbox::lease_owner.eq(owner))
                .select((inbox::object_id, inbox::generation))
                .load::<(i64, i64)>(conn)?,
        );
    }
    let split = split_settled(settlement, &current);
    for settled in split.settled.chunks(MAX_IDS_PER_STATEMENT) {
        diesel::delete(inbox::table.filter(inbox::object_id.eq_any(settled))).execute(conn)?;
    }
    for again in split.again.chunks(MAX_IDS_PER_STATEMENT) {
        diesel::update(inbox::table.filter(inbox::object_id.eq_any(again)))
            .set((
                inbox::lease_owner.eq(None::<String>),
                inbox::lease_until.eq(again_from),
            ))
            .execute(conn)?;
    }
    // One statement per row: each has its own time and cause (a prepared statement run
    // again, in-process).
    for retry in split.retried {
        diesel::update(inbox::table.find(retry.id))
            .set((
                inbox::lease_owner.eq(None::<String>),
                inbox::lease_until.eq(retry.at.as_unix_micros()),
                inbox::attempts.eq(inbox::attempts + 1),
                inbox::last_error.eq(&retry.error),
            ))
            .execute(conn)?;
    }
    Ok(())
}

/// A condition on `fetch_failures`, built at run time.
pub(super) type Selected<'a> =
    Box<dyn BoxableExpression<fetch_failures::table, Sqlite, SqlType = Bool> + 'a>;

/// `filter` as a condition on `fetch_failures`: every part given must hold.
pub(super) fn selected(filter: &FailureFilter) -> Selected<'_> {
    let mut condition: Selected<'_> = Box::new(diesel::dsl::sql::<Bool>("1"));
    if let Some(ids) = &filter.ids {
        let ids: Vec<i64> = ids.iter().map(|id| id.get()).collect();
        condition = Box::new(condition.and(fetch_failures::object_id.eq_any(ids)));
    }
    if let Some(code) = &filter.code {
        condition = Box::new(condition.and(fetch_failures::code.eq(code.clone())));
    }
    if let Some(since) = filter.since {
        condition = Box::new(condition.and(fetch_failures::failed_at.ge(since.as_unix_micros())));
    }
    if let Some(until) = filter.until {
        condition = Box::new(condition.and(fetch_failures::failed_at.lt(until.as_unix_micros())));
    }
    condition
}

/// One dead letter as read: `(seq, object_id, code, reason, failed_at, attempts)`.
pub(super) type DeadLetterRow = (i64, i64, String, String, i64, i32);

/// Up to `query.limit` dead letters `query` selects, newest first:
/// `(seq, object_id, code, reason, failed_at, attempts)`.
pub(super) fn list(
    conn: &mut SqliteConnection,
    query: &FailureQuery,
) -> QueryResult<Vec<DeadLetterRow>> {
    let mut select = fetch_failures::table
        .filter(selected(&query.filter))
        .order(fetch_failures::seq.desc())
        .limit(crate::inbox::sql_limit(query.limit))
        .select((
            fetch_failures::seq,
            fetch_failures::object_id,
            fetch_failures::code,
            fetch_failures::reason,
            fetch_failures::failed_at,
            fetch_failures::attempts,
        ))
        .into_boxed();
    if let Some(before) = query.before {
        select = select.filter(fetch_failures::seq.lt(before));
    }
    select.load(conn)
}

/// Deletes the dead letters `filter` selects; returns how many went.
pub(super) fn purge(conn: &mut SqliteConnection, filter: &FailureFilter) -> QueryResult<u64> {
    let purged = diesel::delete(fetch_failures::table)
        .filter(selected(filter))
        .execute(conn)?;
    Ok(purged as u64)
}

/// In one immediate transaction (durably, as an enqueue), deletes the dead letters
/// `filter` selects and enqueues their distinct ids as requested at `at`; returns how many
/// dead letters went.
pub(super) fn replay(
    conn: &mut SqliteConnection,
    filter: &FailureFilter,
    at: i64,
) -> QueryResult<u64> {
    durably(conn, |conn| {
        let ids: Vec<i64> = diesel::delete(fetch_failures::table)
            .filter(selected(filter))
            .returning(fetch_failures::object_id)
            .get_results(conn)?;
        let replayed = ids.len() as u64;
        let enqueue = Enqueue {
            ids: distinct_ids(ids),
            traces: Vec::new(),
        };
        enqueue_in_transaction(conn, &enqueue, at)?;
        Ok(replayed)
    })
}
