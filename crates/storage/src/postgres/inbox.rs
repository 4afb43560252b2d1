//! The inbox's writes on PostgreSQL: the enqueue statement, and `complete`'s transaction.

use diesel::pg::Pg;
use diesel::pg::data_types::PgTimestamp;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use domain::StoreError;
use domain::ports::FailureFilter;

use super::schema::{fetch_failures, inbox};
use super::to_pg;
use super::upsert::UpsertBatch;
use crate::inbox::{Enqueue, Settlement, distinct_ids, split_settled};

/// How many failures one `INSERT` carries: four bind parameters each keeps a statement at
/// 40 000, under PostgreSQL's limit of 65 535.
const MAX_FAILURES_PER_STATEMENT: usize = 10_000;

/// The SQL before, between and after the two parameters of [`EnqueueBatch`].
///
/// The ids go in ascending order (the array is sorted, `ORDER BY` makes it a guarantee):
/// concurrent enqueues that share ids lock those rows in the same order and wait for each
/// other instead of deadlocking. A waiting id keeps its `requested_at` (the first request
/// still waiting) and gets its generation bumped.
const ENQUEUE_SQL: [&str; 3] = [
    "INSERT INTO inbox (object_id, requested_at) \
     SELECT id, ",
    "::timestamptz FROM unnest(",
    "::bigint[]) AS batch (id) ORDER BY id \
     ON CONFLICT (object_id) DO UPDATE SET generation = inbox.generation + 1",
];

/// One enqueue as one statement, whatever its size: an array of ids and the request time.
///
/// A query fragment with a static query id rather than a `sql_query`, so that diesel-async
/// prepares it once per connection (see [`UpsertBatch`]).
#[derive(Debug, QueryId)]
pub(super) struct EnqueueBatch {
    requested_at: PgTimestamp,
    ids: Vec<i64>,
}

impl EnqueueBatch {
    /// Enqueues `ids` (ascending, each once) as requested at `requested_at`.
    pub(super) fn new(ids: Vec<i64>, requested_at: PgTimestamp) -> Self {
        debug_assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
        Self { requested_at, ids }
    }
}

impl QueryFragment<Pg> for EnqueueBatch {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(ENQUEUE_SQL[0]);
        out.push_bind_param::<Timestamptz, _>(&self.requested_at)?;
        out.push_sql(ENQUEUE_SQL[1]);
        out.push_bind_param::<Array<BigInt>, _>(&self.ids)?;
        out.push_sql(ENQUEUE_SQL[2]);
        Ok(())
    }
}

/// The SQL around the three parameters of [`EnqueueTracedBatch`]: as [`ENQUEUE_SQL`], with a
/// parallel array of trace contexts; a waiting id takes the new context unless it is NULL.
const ENQUEUE_TRACED_SQL: [&str; 4] = [
    "INSERT INTO inbox (object_id, requested_at, trace) \
     SELECT id, ",
    "::timestamptz, trace FROM unnest(",
    "::bigint[], ",
    "::text[]) AS batch (id, trace) ORDER BY id \
     ON CONFLICT (object_id) DO UPDATE SET generation = inbox.generation + 1, \
     trace = COALESCE(EXCLUDED.trace, inbox.trace)",
];

/// [`EnqueueBatch`] with each id's trace context: used only when traces are on, so the
/// usual statement stays as small as it was. A type of its own, because diesel-async
/// caches prepared statements by query type.
#[derive(Debug, QueryId)]
pub(super) struct EnqueueTracedBatch {
    requested_at: PgTimestamp,
    ids: Vec<i64>,
    traces: Vec<Option<String>>,
}

impl EnqueueTracedBatch {
    /// Enqueues the ids of `enqueue`, with their traces, as requested at `requested_at`.
    pub(super) fn new(enqueue: Enqueue, requested_at: PgTimestamp) -> Self {
        debug_assert_eq!(enqueue.ids.len(), enqueue.traces.len());
        Self {
            requested_at,
            ids: enqueue.ids,
            traces: enqueue.traces,
        }
    }
}

impl QueryFragment<Pg> for EnqueueTracedBatch {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(ENQUEUE_TRACED_SQL[0]);
        out.push_bind_param::<Timestamptz, _>(&self.requested_at)?;
        out.push_sql(ENQUEUE_TRACED_SQL[1]);
        out.push_bind_param::<Array<BigInt>, _>(&self.ids)?;
        out.push_sql(ENQUEUE_TRACED_SQL[2]);
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.traces)?;
        out.push_sql(ENQUEUE_TRACED_SQL[3]);
        Ok(())
    }
}

/// One failure as `fetch_failures` stores it: `(object_id, code, reason, failed_at,
/// attempts)`.
pub(super) type FailureRow = (i64, String, String, PgTimestamp, i32);

/// What one `complete` writes: the objects to upsert (sorted by id), the failures, and the
/// claims (see [`Settlement`]).
#[derive(Debug)]
pub(super) struct Completion {
    pub(super) owner: String,
    pub(super) online: Option<UpsertBatch>,
    pub(super) failures: Vec<FailureRow>,
    pub(super) settlement: Settlement,
    /// When ids requested again since their claim become claimable.
    pub(super) again_from: PgTimestamp,
}

impl Completion {
    /// Writes it all in one transaction.
    ///
    /// Rows are locked in one order everywhere, so concurrent completions, enqueues and
    /// upserts wait for each other instead of deadlocking: `objects` first, ascending by
    /// id (the upsert), then `inbox`, ascending by id (`SELECT … ORDER BY object_id FOR
    /// UPDATE` before anything changes there).
    pub(super) async fn execute(self, conn: &mut AsyncPgConnection) -> QueryResult<()> {
        let Self {
            owner,
            online,
            failures,
            settlement,
            again_from,
        } = self;
        conn.transaction(async move |conn| {
            if let Some(online) = online {
                online.execute(conn).await?;
            }
            record_failures(conn, &failures).await?;
            settle(conn, &owner, &settlement, again_from).await
        })
        .await
    }
}

/// Appends `failures`; dead letters are kept until replayed, purged or past retention.
async fn record_failures(conn: &mut AsyncPgConnection, failures: &[FailureRow]) -> QueryResult<()> {
    for chunk in failures.chunks(MAX_FAILURES_PER_STATEMENT) {
        let values: Vec<_> = chunk
            .iter()
            .map(|(object_id, code, reason, failed_at, attempts)| {
                (
                    fetch_failures::object_id.eq(*object_id),
                    fetch_failures::code.eq(code),
                    fetch_failures::reason.eq(reason),
                    fetch_failures::failed_at.eq(*failed_at),
                    fetch_failures::attempts.eq(*attempts),
                )
            })
            .collect();
        diesel::insert_into(fetch_failures::table)
            .values(values)
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Hands ids back for their next attempt, each with its own time and cause, in one
/// statement: `UPDATE … FROM unnest(ids, times, causes)`.
const RETRY_SQL: &str = "UPDATE inbox SET lease_owner = NULL, lease_until = r.at, \
     attempts = inbox.attempts + 1, last_error = r.error \
     FROM unnest($1::bigint[], $2::timestamptz[], $3::text[]) AS r (id, at, error) \
     WHERE inbox.object_id = r.id";

/// Locks the claimed rows still in the inbox and leased to `owner` in id order; hands the
/// ones that failed transiently back for their next attempt (no owner, `lease_until` =
/// that attempt's time, one more attempt counted, the cause kept); removes those whose
/// generation is unchanged and hands the others back, claimable from `again_from` (no
/// owner, `lease_until` = `again_from`). Rows another instance has taken over are left
/// alone.
async fn settle(
    conn: &mut AsyncPgConnection,
    owner: &str,
    settlement: &Settlement,
    again_from: PgTimestamp,
) -> QueryResult<()> {
    if settlement.claims.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = settlement.claims.iter().map(|claim| claim.0).collect();
    let current: Vec<(i64, i64)> = inbox::table
        .filter(inbox::object_id.eq_any(&ids))
        .filter(inbox::lease_owner.eq(owner))
        .select((inbox::object_id, inbox::generation))
        .order(inbox::object_id.asc())
        .for_update()
        .load(conn)
        .await?;
    let split = split_settled(settlement, &current);
    let (settled, again) = (split.settled, split.again);
    if !split.retried.is_empty() {
        let ids: Vec<i64> = split.retried.iter().map(|retry| retry.id).collect();
        let times = split
            .retried
            .iter()
            .map(|retry| to_pg(retry.at))
            .collect::<Result<Vec<PgTimestamp>, StoreError>>()
            .map_err(|err| diesel::result::Error::SerializationError(Box::new(err)))?;
        let errors: Vec<&str> = split
            .retried
            .iter()
            .map(|retry| retry.error.as_str())
            .collect();
        diesel::sql_query(RETRY_SQL)
            .bind::<Array<BigInt>, _>(&ids)
            .bind::<Array<Timestamptz>, _>(&times)
            .bind::<Array<Text>, _>(&errors)
            .execute(conn)
            .await?;
    }
    if !settled.is_empty() {
        diesel::delete(inbox::table.filter(inbox::object_id.eq_any(&settled)))
            .execute(conn)
            .await?;
    }
    if !again.is_empty() {
        diesel::update(inbox::table.filter(inbox::object_id.eq_any(&again)))
            .set((
                inbox::lease_owner.eq(None::<String>),
                inbox::lease_until.eq(again_from),
            ))
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// The condition of a [`FailureFilter`] on `fetch_failures`, with its four parameters
/// each either NULL (no condition) or the bound: one static statement, whatever is given.
macro_rules! selected_sql {
    () => {
        "($1::bigint[] IS NULL OR object_id = ANY($1)) \
         AND ($2::text IS NULL OR code = $2) \
         AND ($3::timestamptz IS NULL OR failed_at >= $3) \
         AND ($4::timestamptz IS NULL OR failed_at < $4)"
    };
}

/// The dead letters a [`FailureFilter`] selects, newest first, older than `$5` when given,
/// at most `$6`.
const LIST_SQL: &str = concat!(
    "SELECT seq, object_id, code, reason, failed_at, attempts FROM fetch_failures WHERE ",
    selected_sql!(),
    " AND ($5::bigint IS NULL OR seq < $5) ORDER BY seq DESC LIMIT $6"
);

/// Deletes the dead letters a [`FailureFilter`] selects, returning their ids.
const TAKE_SQL: &str = concat!(
    "DELETE FROM fetch_failures WHERE ",
    selected_sql!(),
    " RETURNING object_id"
);

/// A [`FailureFilter`] as the parameters of [`selected_sql!`].
#[derive(Debug, Clone)]
pub(super) struct Selected {
    ids: Option<Vec<i64>>,
    code: Option<String>,
    since: Option<PgTimestamp>,
    until: Option<PgTimestamp>,
}

impl Selected {
    pub(super) fn new(filter: &FailureFilter) -> Result<Self, StoreError> {
        Ok(Self {
            ids: filter
                .ids
                .as_ref()
                .map(|ids| ids.iter().map(|id| id.get()).collect()),
            code: filter.code.clone(),
            since: filter.since.map(to_pg).transpose()?,
            until: filter.until.map(to_pg).transpose()?,
        })
    }

    /// `sql` (which starts with [`selected_sql!`]'s parameters) with them bound.
    fn query(self, sql: &'static str) -> BoxedSqlQuery<'static, Pg, SqlQuery> {
        diesel::sql_query(sql)
            .into_boxed::<Pg>()
            .bind::<Nullable<Array<BigInt>>, _>(self.ids)
            .bind::<Nullable<Text>, _>(self.code)
            .bind::<Nullable<Timestamptz>, _>(self.since)
            .bind::<Nullable<Timestamptz>, _>(self.until)
    }
}

/// One row of [`LIST_SQL`].
#[derive(Debug, QueryableByName)]
pub(super) struct DeadLetterRow {
    #[diesel(sql_type = BigInt)]
    pub(super) seq: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) object_id: i64,
    #[diesel(sql_type = Text)]
    pub(super) code: String,
    #[diesel(sql_type = Text)]
    pub(super) reason: String,
    #[diesel(sql_type = Timestamptz)]
    pub(super) failed_at: PgTimestamp,
    #[diesel(sql_type = Integer)]
    pub(super) attempts: i32,
}

/// One row of [`TAKE_SQL`].
#[derive(Debug, QueryableByName)]
struct TakenRow {
    #[diesel(sql_type = BigInt)]
    object_id: i64,
}

/// Up to `limit` dead letters `selected` chooses, older than `before` when given.
pub(super) async fn list(
    conn: &mut AsyncPgConnection,
    selected: Selected,
    before: Option<i64>,
    limit: i64,
) -> QueryResult<Vec<DeadLetterRow>> {
    selected
        .query(LIST_SQL)
        .bind::<Nullable<BigInt>, _>(before)
        .bind::<BigInt, _>(limit)
        .load(conn)
        .await
}

/// Deletes the dead letters `selected` chooses; returns how many went.
pub(super) async fn purge(conn: &mut AsyncPgConnection, selected: Selected) -> QueryResult<u64> {
    let taken: Vec<TakenRow> = selected.query(TAKE_SQL).load(conn).await?;
    Ok(taken.len() as u64)
}

/// In one transaction, deletes the dead letters `selected` chooses and enqueues their
/// distinct ids as requested at `at`; returns how many dead letters went.
pub(super) async fn replay(
    conn: &mut AsyncPgConnection,
    selected: Selected,
    at: PgTimestamp,
) -> QueryResult<u64> {
    conn.transaction(async move |conn| {
        let taken: Vec<TakenRow> = selected.query(TAKE_SQL).load(conn).await?;
        let replayed = taken.len() as u64;
        let ids = distinct_ids(taken.into_iter().map(|row| row.object_id).collect());
        if !ids.is_empty() {
            EnqueueBatch::new(ids, at).execute(conn).await?;
        }
        Ok(replayed)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enqueue_binds_the_time_and_one_array_and_bumps_the_generation() {
        let batch = EnqueueBatch::new(vec![1, 2, 9], PgTimestamp(5));
        let sql = diesel::debug_query::<Pg, _>(&batch).to_string();
        assert!(
            sql.starts_with(
                "INSERT INTO inbox (object_id, requested_at) SELECT id, $1::timestamptz \
                 FROM unnest($2::bigint[]) AS batch (id) ORDER BY id \
                 ON CONFLICT (object_id) DO UPDATE SET generation = inbox.generation + 1"
            ),
            "{sql}"
        );
    }

    #[test]
    fn the_traced_enqueue_binds_a_parallel_array_and_keeps_a_known_trace() {
        let enqueue = Enqueue {
            ids: vec![1, 2],
            traces: vec![Some("t".to_owned()), None],
        };
        let batch = EnqueueTracedBatch::new(enqueue, PgTimestamp(5));
        let sql = diesel::debug_query::<Pg, _>(&batch).to_string();
        assert!(
            sql.starts_with(
                "INSERT INTO inbox (object_id, requested_at, trace) SELECT id, $1::timestamptz, \
                 trace FROM unnest($2::bigint[], $3::text[]) AS batch (id, trace) ORDER BY id \
                 ON CONFLICT (object_id) DO UPDATE SET generation = inbox.generation + 1, \
                 trace = COALESCE(EXCLUDED.trace, inbox.trace)"
            ),
            "{sql}"
        );
    }
}
