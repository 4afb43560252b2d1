//! The batched upsert: one `INSERT … SELECT … FROM unnest(…) ON CONFLICT … DO UPDATE`
//! statement per batch, whatever its size.
//!
//! It is a query fragment of its own rather than a `sql_query`: diesel marks raw SQL as
//! unsafe to cache, so every call would prepare the statement again (one more round trip).
//! This type has a static query id, so diesel-async prepares it once per connection and
//! afterwards sends only the three arrays.

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::pg::data_types::PgTimestamp;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Timestamptz};

/// The SQL before, between and after the three array parameters.
///
/// Rows are inserted in ascending id order (the arrays are sorted too, `ORDER BY` makes the
/// order a guarantee rather than an accident of the plan): two batches that share ids
/// lock their rows in the same order, so concurrent writers wait for each other instead
/// of deadlocking. `GREATEST` keeps each time's maximum, so a write that arrives late or
/// twice never moves a row backwards.
const SQL: [&str; 4] = [
    "INSERT INTO objects (id, last_seen, expires_at) \
     SELECT * FROM unnest(",
    "::bigint[], ",
    "::timestamptz[], ",
    "::timestamptz[]) AS batch (id, last_seen, expires_at) ORDER BY id \
     ON CONFLICT (id) DO UPDATE SET \
     last_seen = GREATEST(objects.last_seen, EXCLUDED.last_seen), \
     expires_at = GREATEST(objects.expires_at, EXCLUDED.expires_at)",
];

/// One batch of rows as three parallel arrays, ready to bind.
#[derive(Debug, Default, QueryId)]
pub(super) struct UpsertBatch {
    ids: Vec<i64>,
    last_seen: Vec<PgTimestamp>,
    expires_at: Vec<PgTimestamp>,
}

impl UpsertBatch {
    /// A batch of `rows` (id, `last_seen`, `expires_at`), sorted by id; each id once.
    pub(super) fn new(mut rows: Vec<(i64, PgTimestamp, PgTimestamp)>) -> Self {
        rows.sort_unstable_by_key(|row| row.0);
        let mut batch = Self {
            ids: Vec::with_capacity(rows.len()),
            last_seen: Vec::with_capacity(rows.len()),
            expires_at: Vec::with_capacity(rows.len()),
        };
        for (id, last_seen, expires_at) in rows {
            batch.ids.push(id);
            batch.last_seen.push(last_seen);
            batch.expires_at.push(expires_at);
        }
        batch
    }

    /// How many rows the batch carries.
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }
}

impl QueryFragment<Pg> for UpsertBatch {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(SQL[0]);
        out.push_bind_param::<Array<BigInt>, _>(&self.ids)?;
        out.push_sql(SQL[1]);
        out.push_bind_param::<Array<Timestamptz>, _>(&self.last_seen)?;
        out.push_sql(SQL[2]);
        out.push_bind_param::<Array<Timestamptz>, _>(&self.expires_at)?;
        out.push_sql(SQL[3]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_binds_three_arrays_and_keeps_the_maxima() {
        let batch = UpsertBatch::new(vec![(2, PgTimestamp(1), PgTimestamp(3))]);
        let sql = diesel::debug_query::<Pg, _>(&batch).to_string();
        assert!(
            sql.starts_with(
                "INSERT INTO objects (id, last_seen, expires_at) SELECT * FROM unnest($1::bigint[], \
                 $2::timestamptz[], $3::timestamptz[])"
            ),
            "{sql}"
        );
        assert!(sql.contains("ON CONFLICT (id) DO UPDATE SET last_seen = GREATEST(objects.last_seen, EXCLUDED.last_seen), expires_at = GREATEST(objects.expires_at, EXCLUDED.expires_at)"), "{sql}");
    }

    #[test]
    fn rows_are_sorted_by_id_and_kept_together() {
        let batch = UpsertBatch::new(vec![
            (9, PgTimestamp(90), PgTimestamp(91)),
            (1, PgTimestamp(10), PgTimestamp(11)),
            (5, PgTimestamp(50), PgTimestamp(51)),
        ]);
        assert_eq!(batch.ids, [1, 5, 9]);
        assert_eq!(
            batch.last_seen,
            [PgTimestamp(10), PgTimestamp(50), PgTimestamp(90)]
        );
        assert_eq!(
            batch.expires_at,
            [PgTimestamp(11), PgTimestamp(51), PgTimestamp(91)]
        );
        assert_eq!(batch.len(), 3);
    }
}
