//! The inbox's multi-statement writes, each one blocking job in one immediate transaction
//! (see [`super::write`] for why they run whole on the blocking thread).

use diesel::dsl::max;
use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text};
use diesel::sqlite::SqliteConnection;
use diesel::upsert::excluded;
use domain::ports::FailureRecord;

use super::schema::{fetch_failures, inbox};
use super::write::{self, Row};
use crate::inbox::{Enqueue, FAILURES_KEPT_SEQ, split_settled};

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
}

impl From<FailureRecord> for FailureRow {
    fn from(record: FailureRecord) -> Self {
        Self {
            object_id: record.id.get(),
            code: record.code,
            reason: record.reason,
            failed_at: record.at.as_unix_micros(),
        }
    }
}

/// Settles claims in one immediate transaction: upserts `online`, records `failures`,
/// removes the claimed rows whose generation is unchanged and hands the others back,
/// claimable from `again_from`. `claims` are `(id, generation)`, ascending by id, each id
/// once.
pub(super) fn complete(
    conn: &mut SqliteConnection,
    owner: &str,
    online: &[Row],
    failures: &[FailureRow],
    claims: &[(i64, i64)],
    again_from: i64,
) -> QueryResult<()> {
    conn.immediate_transaction(|conn| {
        write::upsert_rows(conn, online)?;
        record_failures(conn, failures)?;
        for chunk in claims.chunks(MAX_IDS_PER_STATEMENT) {
            settle(conn, owner, chunk, again_from)?;
        }
        Ok(())
    })
}

/// Appends `failures`, then deletes all but the newest [`FAILURES_KEPT_SEQ`].
fn record_failures(conn: &mut SqliteConnection, failures: &[FailureRow]) -> QueryResult<()> {
    if failures.is_empty() {
        return Ok(());
    }
    for chunk in failures.chunks(MAX_FAILURES_PER_STATEMENT) {
        let values: Vec<_> = chunk
            .iter()
            .map(|failure| {
                (
                    fetch_failures::object_id.eq(failure.object_id),
                    fetch_failures::code.eq(&failure.code),
                    fetch_failures::reason.eq(&failure.reason),
                    fetch_failures::failed_at.eq(failure.failed_at),
                )
            })
            .collect();
        diesel::insert_into(fetch_failures::table)
            .values(values)
            .execute(conn)?;
    }
    // Two probes of the primary key: the newest `seq`, then the range below the kept ones
    // (usually empty, or as many rows as were just added).
    let newest: Option<i64> = fetch_failures::table
        .select(max(fetch_failures::seq))
        .get_result(conn)?;
    if let Some(oldest_gone) = newest.map(|newest| newest - FAILURES_KEPT_SEQ) {
        diesel::delete(fetch_failures::table.filter(fetch_failures::seq.le(oldest_gone)))
            .execute(conn)?;
    }
    Ok(())
}

/// Settles one chunk of claims: reads the generations of the claimed rows still leased to
/// `owner`, removes the unchanged ones and hands the others back, claimable from
/// `again_from` (no owner, `lease_until` = `again_from`); rows another
/// instance has taken over are left alone.
fn settle(
    conn: &mut SqliteConnection,
    owner: &str,
    claims: &[(i64, i64)],
    again_from: i64,
) -> QueryResult<()> {
    let ids: Vec<i64> = claims.iter().map(|claim| claim.0).collect();
    let current: Vec<(i64, i64)> = inbox::table
        .filter(inbox::object_id.eq_any(&ids))
        .filter(inbox::lease_owner.eq(owner))
        .select((inbox::object_id, inbox::generation))
        .load(conn)?;
    let (settled, again) = split_settled(claims, &current);
    if !settled.is_empty() {
        diesel::delete(inbox::table.filter(inbox::object_id.eq_any(&settled))).execute(conn)?;
    }
    if !again.is_empty() {
        diesel::update(inbox::table.filter(inbox::object_id.eq_any(&again)))
            .set((
                inbox::lease_owner.eq(None::<String>),
                inbox::lease_until.eq(again_from),
            ))
            .execute(conn)?;
    }
    Ok(())
}
