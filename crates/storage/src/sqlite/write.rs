//! The upsert, as one blocking job: `BEGIN IMMEDIATE`, one multi-row statement per chunk,
//! `COMMIT`.
//!
//! It runs whole on the blocking thread (through `SyncConnectionWrapper::spawn_blocking`)
//! rather than statement by statement through diesel-async: the write lock is held only
//! while SQLite works, not across hops between threads, and the transaction cannot be
//! left open half-way by a cancelled future.

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel::sqlite::SqliteConnection;
use diesel::upsert::excluded;
use domain::StoredObject;

use super::schema::objects;

/// How many rows one `INSERT` carries: three bind variables each keeps a statement at
/// 30 000 variables, under SQLite's limit of 32 766.
pub(super) const MAX_ROWS_PER_STATEMENT: usize = 10_000;

diesel::define_sql_function! {
    /// SQLite's scalar `max(a, b)`: the larger of two values (not the aggregate).
    #[sql_name = "max"]
    fn later_of(a: BigInt, b: BigInt) -> BigInt;
}

/// One object as the table stores it: id, `last_seen`, `expires_at` in microseconds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Row {
    id: i64,
    last_seen: i64,
    expires_at: i64,
}

impl From<&StoredObject> for Row {
    fn from(object: &StoredObject) -> Self {
        Self {
            id: object.id.get(),
            last_seen: object.last_seen.as_unix_micros(),
            expires_at: object.expires_at.as_unix_micros(),
        }
    }
}

/// Inserts or refreshes `rows` in one immediate transaction; times only move forward.
pub(super) fn upsert(conn: &mut SqliteConnection, rows: &[Row]) -> QueryResult<()> {
    conn.immediate_transaction(|conn| upsert_rows(conn, rows))
}

/// Inserts or refreshes `rows`, one statement per chunk, in the caller's transaction.
pub(super) fn upsert_rows(conn: &mut SqliteConnection, rows: &[Row]) -> QueryResult<()> {
    for chunk in rows.chunks(MAX_ROWS_PER_STATEMENT) {
        let values: Vec<_> = chunk
            .iter()
            .map(|row| {
                (
                    objects::id.eq(row.id),
                    objects::last_seen.eq(row.last_seen),
                    objects::expires_at.eq(row.expires_at),
                )
            })
            .collect();
        diesel::insert_into(objects::table)
            .values(values)
            .on_conflict(objects::id)
            .do_update()
            .set((
                objects::last_seen.eq(later_of(objects::last_seen, excluded(objects::last_seen))),
                objects::expires_at
                    .eq(later_of(objects::expires_at, excluded(objects::expires_at))),
            ))
            .execute(conn)?;
    }
    Ok(())
}
