//! The inbox's writes on PostgreSQL: the enqueue statement, and `complete`'s transaction.

use diesel::dsl::max;
use diesel::pg::Pg;
use diesel::pg::data_types::PgTimestamp;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::schema::{fetch_failures, inbox};
use super::upsert::UpsertBatch;
use crate::inbox::{Enqueue, FAILURES_KEPT_SEQ, split_settled};

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

/// One failure as `fetch_failures` stores it.
pub(super) type FailureRow = (i64, String, String, PgTimestamp);

/// What one `complete` writes: the objects to upsert (sorted by id), the failures, and the
/// claims as `(id, generation)`, ascending by id, each id once.
#[derive(Debug)]
pub(super) struct Completion {
    pub(super) owner: String,
    pub(super) online: Option<UpsertBatch>,
    pub(super) failures: Vec<FailureRow>,
    pub(super) claims: Vec<(i64, i64)>,
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
            claims,
            again_from,
        } = self;
        conn.transaction(async move |conn| {
            if let Some(online) = online {
                online.execute(conn).await?;
            }
            record_failures(conn, &failures).await?;
            settle(conn, &owner, &claims, again_from).await
        })
        .await
    }
}

/// Appends `failures`, then deletes all but the newest [`FAILURES_KEPT_SEQ`].
async fn record_failures(conn: &mut AsyncPgConnection, failures: &[FailureRow]) -> QueryResult<()> {
    if failures.is_empty() {
        return Ok(());
    }
    for chunk in failures.chunks(MAX_FAILURES_PER_STATEMENT) {
        let values: Vec<_> = chunk
            .iter()
            .map(|(object_id, code, reason, failed_at)| {
                (
                    fetch_failures::object_id.eq(*object_id),
                    fetch_failures::code.eq(code),
                    fetch_failures::reason.eq(reason),
                    fetch_failures::failed_at.eq(*failed_at),
                )
            })
            .collect();
        diesel::insert_into(fetch_failures::table)
            .values(values)
            .execute(conn)
            .await?;
    }
    // Two probes of the primary key: the newest `seq`, then the range below the kept ones
    // (usually empty, or as many rows as were just added). Failures committed meanwhile by
    // other transactions may leave a few more for a moment; the next write removes them.
    let newest: Option<i64> = fetch_failures::table
        .select(max(fetch_failures::seq))
        .get_result(conn)
        .await?;
    if let Some(oldest_gone) = newest.map(|newest| newest - FAILURES_KEPT_SEQ) {
        diesel::delete(fetch_failures::table.filter(fetch_failures::seq.le(oldest_gone)))
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Locks the claimed rows still in the inbox and leased to `owner` in id order, removes
/// those whose generation is unchanged and hands the others back, claimable from
/// `again_from` (no owner, `lease_until` = `again_from`); rows another
/// instance has taken over are left alone.
async fn settle(
    conn: &mut AsyncPgConnection,
    owner: &str,
    claims: &[(i64, i64)],
    again_from: PgTimestamp,
) -> QueryResult<()> {
    if claims.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = claims.iter().map(|claim| claim.0).collect();
    let current: Vec<(i64, i64)> = inbox::table
        .filter(inbox::object_id.eq_any(&ids))
        .filter(inbox::lease_owner.eq(owner))
        .select((inbox::object_id, inbox::generation))
        .order(inbox::object_id.asc())
        .for_update()
        .load(conn)
        .await?;
    let (settled, again) = split_settled(claims, &current);
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
