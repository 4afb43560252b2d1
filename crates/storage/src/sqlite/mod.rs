//! The embedded SQLite store: diesel's SQLite backend behind diesel-async's
//! `SyncConnectionWrapper`, pooled by deadpool.

mod inbox;
mod schema;
mod write;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use diesel::result::{ConnectionError, DatabaseErrorKind};
use diesel::sqlite::{Sqlite, SqliteConnection};
use diesel_async::RunQueryDsl;
use diesel_async::pooled_connection::deadpool::{Object, Pool};

use crate::errors::pool_error;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use domain::ports::{
    Backlog, Claim, Completion, DeadLetter, FailureFilter, FailureQuery, FailureRecord, Requested,
};
use domain::{ObjectId, StoreError, StoredObject, Timestamp};
use tracing::Instrument;

use self::schema::{inbox as inbox_rows, objects};
use crate::inbox::{
    ClaimedRow, Enqueue, Settlement, claims_in_order, sql_limit, stored_count, stored_id,
};
use crate::{OpenError, StoreOptions};

/// The migrations of the SQLite backend, compiled into the binary.
const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// The `busy_timeout` statement of [`SESSION_SETTINGS`], as a macro so `concat!` takes it
/// and the health probe can set it back after its shorter wait.
macro_rules! session_busy_timeout {
    () => {
        "PRAGMA busy_timeout = 5000;"
    };
}

/// The session settings of every connection, applied in [`connect`] and nowhere else.
///
/// `busy_timeout` (how long a statement waits for another writer's lock before it fails
/// as unavailable) comes first, so the statements after it already wait for locks.
///
/// `synchronous = NORMAL` in WAL mode: a commit survives `kill -9` (it is in the log the
/// moment it commits) and the log is synced at checkpoints. The inbox enqueue, the write
/// behind every `202`, runs under `FULL` instead ([`inbox::durably`]): it also survives
/// power loss, and its sync carries every earlier commit with it (the log is sequential).
/// Any other write lost to a power cut is done again: outcomes (the inbox row is still
/// there, so the id is fetched again), deletions (the sweeper finds the row again), leases.
const SESSION_SETTINGS: &str = concat!(
    session_busy_timeout!(),
    "PRAGMA journal_mode = WAL;",
    "PRAGMA synchronous = NORMAL;",
    "PRAGMA foreign_keys = ON;",
);

/// The session's `busy_timeout`, as [`SESSION_SETTINGS`] sets it.
const SESSION_BUSY_TIMEOUT: &str = session_busy_timeout!();

/// How long the health probe waits for another process's write lock: a health check must
/// answer quickly, and a lock held longer than this is worth reporting.
const PING_BUSY_TIMEOUT_MS: u32 = 250;

type AsyncSqlite = SyncConnectionWrapper<SqliteConnection>;

/// The [`ObjectStore`] and [`Inbox`] on an embedded SQLite database file.
///
/// Every call runs on its own tokio task with a pooled connection, so a caller that gives
/// up (a timeout, a dropped request) never leaves a statement or a transaction half done
/// and never blocks a runtime thread while diesel-async waits for the abandoned query.
/// Writes from this process take turns on an async lock instead of spinning in SQLite's
/// busy handler; `busy_timeout` still covers other processes that open the same file.
pub struct SqliteStore {
    pool: Pool<AsyncSqlite>,
    writes: Arc<tokio::sync::Mutex<()>>,
    wait_timeout: Duration,
    path: PathBuf,
    gauges: Arc<crate::metrics::PoolGauges>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}

/// Whether a call writes, and so must take its turn on the write lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

impl SqliteStore {
    /// Opens (creating it and its directory if missing) the database file at `path` and
    /// applies the pending migrations.
    pub async fn open(path: impl Into<PathBuf>, options: &StoreOptions) -> Result<Self, OpenError> {
        let path = path.into();
        if options.max_connections == 0 {
            return Err(OpenError::InvalidOptions(
                "max_connections must be at least 1",
            ));
        }
        let Some(url) = path.to_str().map(str::to_owned) else {
            return Err(OpenError::InvalidSqliteUrl("the path is not valid utf-8"));
        };

        let prepare_path = path.clone();
        let applied = tokio::task::spawn_blocking(move || prepare(&prepare_path))
            .await
            .map_err(OpenError::Task)??;

        let mut config = ManagerConfig::<AsyncSqlite>::default();
        // A local file does not drop connections: checking out needs no round trip, only
        // the check for a transaction left open that diesel-async always makes.
        config.recycling_method = RecyclingMethod::Fast;
        config.custom_setup = Box::new(|url: &str| {
            let url = url.to_owned();
            Box::pin(async move {
                let conn = tokio::task::spawn_blocking(move || connect(&url))
                    .await
                    .map_err(|err| {
                        ConnectionError::BadConnection(format!(
                            "connection setup task failed: {err}"
                        ))
                    })??;
                Ok(SyncConnectionWrapper::new(conn))
            })
        });
        let manager = AsyncDieselConnectionManager::new_with_config(url, config);
        let pool = Pool::builder(manager)
            .max_size(options.max_connections)
            .wait_timeout(Some(options.wait_timeout))
            .create_timeout(Some(options.wait_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(OpenError::Pool)?;

        let store = Self {
            pool,
            writes: Arc::new(tokio::sync::Mutex::new(())),
            wait_timeout: options.wait_timeout,
            path,
            gauges: Arc::new(crate::metrics::PoolGauges::register()),
        };
        store.ping_database().await.map_err(OpenError::Check)?;
        tracing::info!(
            path = %store.path.display(),
            max_connections = options.max_connections,
            migrations_applied = ?applied,
            "sqlite store opened"
        );
        Ok(store)
    }

    /// Runs `op` with a pooled connection on a task of its own and waits for its result.
    ///
    /// The task owns the connection: if the caller stops waiting, the operation still
    /// finishes (or rolls back) and the connection goes back to the pool clean.
    async fn run<T, F, Fut>(&self, access: Access, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Object<AsyncSqlite>) -> Fut + Send + 'static,
        Fut: Future<Output = QueryResult<T>> + Send + 'static,
    {
        let pool = self.pool.clone();
        let writes = Arc::clone(&self.writes);
        let wait_timeout = self.wait_timeout;
        let gauges = Arc::clone(&self.gauges);
        let task = tokio::spawn(
            async move {
                let _turn = match access {
                    Access::Read => None,
                    Access::Write => Some(
                        tokio::time::timeout(wait_timeout, writes.lock_owned())
                            .await
                            .map_err(|_| {
                                StoreError::Unavailable(format!(
                                    "timed out after {wait_timeout:?} waiting for the write lock"
                                ))
                            })?,
                    ),
                };
                let conn = pool.get().await.map_err(pool_error)?;
                gauges.observe(&pool.status());
                let result = op(conn).await.map_err(query_error);
                // The connection is back in the pool by now.
                gauges.observe(&pool.status());
                result
            }
            .in_current_span(),
        );
        match task.await {
            Ok(result) => result,
            Err(err) => match err.try_into_panic() {
                // A panic inside the operation is the caller's panic, as if it ran inline.
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(err) => Err(StoreError::Unavailable(format!("store task failed: {err}"))),
            },
        }
    }

    #[tracing::instrument(level = "debug", name = "sqlite.upsert_seen", skip_all, fields(rows = batch.len()))]
    async fn upsert(&self, batch: &[StoredObject]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let rows: Vec<write::Row> = batch.iter().map(write::Row::from).collect();
        self.run(Access::Write, move |mut conn| async move {
            conn.spawn_blocking(move |conn| write::upsert(conn, &rows))
                .await
        })
        .await
    }

    #[tracing::instrument(level = "debug", name = "sqlite.delete_expired", skip_all, fields(cutoff = cutoff.as_unix_micros(), limit, deleted = tracing::field::Empty))]
    async fn delete_due(&self, cutoff: Timestamp, limit: usize) -> Result<u64, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let deleted = self
            .run(Access::Write, move |mut conn| async move {
                // `DELETE … WHERE id IN (SELECT id … ORDER BY expires_at LIMIT ?)`: the
                // subquery reads the same table, which diesel wants under an alias.
                let due_rows = diesel::alias!(objects as due);
                let due = due_rows
                    .select(due_rows.field(objects::id))
                    .filter(
                        due_rows
                            .field(objects::expires_at)
                            .le(cutoff.as_unix_micros()),
                    )
                    .order(due_rows.field(objects::expires_at).asc())
                    .limit(limit);
                diesel::delete(objects::table.filter(objects::id.eq_any(due)))
                    .execute(&mut conn)
                    .await
            })
            .await?;
        tracing::Span::current().record("deleted", deleted);
        Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
    }

    #[tracing::instrument(level = "debug", name = "sqlite.next_expiry", skip_all)]
    async fn earliest_expiry(&self) -> Result<Option<Timestamp>, StoreError> {
        let earliest = self
            .run(Access::Read, |mut conn| async move {
                objects::table
                    .select(diesel::dsl::min(objects::expires_at))
                    .get_result::<Option<i64>>(&mut conn)
                    .await
            })
            .await?;
        Ok(earliest.map(Timestamp::from_unix_micros))
    }

    #[tracing::instrument(level = "debug", name = "sqlite.get", skip_all, fields(object_id = id.get()))]
    async fn get_live(
        &self,
        id: ObjectId,
        now: Timestamp,
    ) -> Result<Option<StoredObject>, StoreError> {
        let row = self
            .run(Access::Read, move |mut conn| async move {
                objects::table
                    .find(id.get())
                    .filter(objects::expires_at.gt(now.as_unix_micros()))
                    .select(ObjectRow::as_select())
                    .get_result(&mut conn)
                    .await
                    .optional()
            })
            .await?;
        row.map(ObjectRow::into_domain).transpose()
    }

    #[tracing::instrument(level = "debug", name = "sqlite.list", skip_all, fields(after = after.map(ObjectId::get), limit))]
    async fn list_live(
        &self,
        now: Timestamp,
        after: Option<ObjectId>,
        limit: usize,
    ) -> Result<Vec<StoredObject>, StoreError> {
        // Ids are never negative, so "no cursor" is "after -1": one statement shape, which
        // diesel prepares once per connection and caches.
        let after = after.map_or(-1, ObjectId::get);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .run(Access::Read, move |mut conn| async move {
                objects::table
                    .filter(objects::id.gt(after))
                    .filter(objects::expires_at.gt(now.as_unix_micros()))
                    .order(objects::id.asc())
                    .limit(limit)
                    .select(ObjectRow::as_select())
                    .load(&mut conn)
                    .await
            })
            .await?;
        rows.into_iter().map(ObjectRow::into_domain).collect()
    }

    /// Checks that the file can be written now, not only read: in WAL mode a read needs no
    /// lock, so `SELECT 1` would answer while another process holds the write lock and
    /// every callback fails. `BEGIN IMMEDIATE` takes the write lock (waiting at most
    /// [`PING_BUSY_TIMEOUT_MS`]) and `ROLLBACK` gives it back at once; nothing is written.
    #[tracing::instrument(level = "debug", name = "sqlite.ping", skip_all)]
    async fn ping_database(&self) -> Result<(), StoreError> {
        self.run(Access::Write, |mut conn| async move {
            conn.spawn_blocking(|conn| {
                use diesel::connection::SimpleConnection as _;
                conn.batch_execute(&format!("PRAGMA busy_timeout = {PING_BUSY_TIMEOUT_MS};"))?;
                let probe = conn.batch_execute("BEGIN IMMEDIATE; ROLLBACK;");
                // The session's own timeout comes back whatever the probe did.
                let restored = conn.batch_execute(SESSION_BUSY_TIMEOUT);
                probe.and(restored)
            })
            .await
        })
        .await
    }

    #[tracing::instrument(level = "debug", name = "sqlite.enqueue", skip_all, fields(ids = requests.len()))]
    async fn enqueue_ids(&self, requests: &[Requested], at: Timestamp) -> Result<(), StoreError> {
        if requests.is_empty() {
            return Ok(());
        }
        let enqueue = Enqueue::new(requests);
        let at = at.as_unix_micros();
        self.run(Access::Write, move |mut conn| async move {
            conn.spawn_blocking(move |conn| inbox::enqueue(conn, &enqueue, at))
                .await
        })
        .await
    }

    #[tracing::instrument(level = "debug", name = "sqlite.claim", skip_all, fields(owner, limit, claimed = tracing::field::Empty))]
    async fn claim_ids(
        &self,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<Claim>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let owner = owner.to_owned();
        let now = now.as_unix_micros();
        let lease_until = lease_until.as_unix_micros();
        let limit = sql_limit(limit);
        let rows = self
            .run(Access::Write, move |mut conn| async move {
                // `UPDATE … WHERE object_id IN (SELECT … ORDER BY requested_at LIMIT ?)
                // RETURNING …`: one statement, so no other writer (of this process or
                // another) can lease the same ids in between.
                let free_rows = diesel::alias!(inbox_rows as free);
                let free = free_rows
                    .select(free_rows.field(inbox_rows::object_id))
                    .filter(
                        free_rows
                            .field(inbox_rows::lease_until)
                            .is_null()
                            .or(free_rows.field(inbox_rows::lease_until).le(now)),
                    )
                    .order(free_rows.field(inbox_rows::requested_at).asc())
                    .limit(limit);
                diesel::update(inbox_rows::table.filter(inbox_rows::object_id.eq_any(free)))
                    .set((
                        inbox_rows::lease_owner.eq(owner),
                        inbox_rows::lease_until.eq(lease_until),
                    ))
                    .returning((
                        inbox_rows::object_id,
                        inbox_rows::generation,
                        inbox_rows::requested_at,
                        inbox_rows::trace,
                        inbox_rows::attempts,
                    ))
                    .get_results::<ClaimedRow<i64>>(&mut conn)
                    .await
            })
            .await?;
        tracing::Span::current().record("claimed", rows.len());
        claims_in_order(
            rows.into_iter()
                .map(|(id, generation, at, trace, attempts)| {
                    (
                        id,
                        generation,
                        Timestamp::from_unix_micros(at),
                        trace,
                        attempts,
                    )
                })
                .collect(),
        )
    }

    #[tracing::instrument(level = "debug", name = "sqlite.complete", skip_all, fields(claims = done.len()))]
    async fn complete_claims(
        &self,
        owner: &str,
        done: &[Completion],
        again_from: Timestamp,
    ) -> Result<(), StoreError> {
        let settlement = Settlement::new(done)?;
        if settlement.is_empty() {
            return Ok(());
        }
        let owner = owner.to_owned();
        let again_from = again_from.as_unix_micros();
        self.run(Access::Write, move |mut conn| async move {
            conn.spawn_blocking(move |conn| inbox::complete(conn, &owner, &settlement, again_from))
                .await
        })
        .await
    }

    #[tracing::instrument(level = "debug", name = "sqlite.renew", skip_all, fields(owner, renewed = tracing::field::Empty))]
    async fn renew_leases(&self, owner: &str, lease_until: Timestamp) -> Result<u64, StoreError> {
        let owner = owner.to_owned();
        let until = lease_until.as_unix_micros();
        let renewed = self
            .run(Access::Write, move |mut conn| async move {
                diesel::update(inbox_rows::table.filter(inbox_rows::lease_owner.eq(owner)))
                    .set(inbox_rows::lease_until.eq(Some(until)))
                    .execute(&mut conn)
                    .await
            })
            .await?;
        tracing::Span::current().record("renewed", renewed);
        Ok(u64::try_from(renewed).unwrap_or(u64::MAX))
    }

    #[tracing::instrument(level = "debug", name = "sqlite.release", skip_all, fields(owner, released = tracing::field::Empty))]
    async fn release_leases(&self, owner: Option<&str>) -> Result<u64, StoreError> {
        let owner = owner.map(str::to_owned);
        let released = self
            .run(Access::Write, move |mut conn| async move {
                let free = (
                    inbox_rows::lease_owner.eq(None::<String>),
                    inbox_rows::lease_until.eq(None::<i64>),
                );
                match owner {
                    Some(owner) => {
                        diesel::update(inbox_rows::table.filter(inbox_rows::lease_owner.eq(owner)))
                            .set(free)
                            .execute(&mut conn)
                            .await
                    }
                    None => {
                        diesel::update(
                            inbox_rows::table.filter(inbox_rows::lease_owner.is_not_null()),
                        )
                        .set(free)
                        .execute(&mut conn)
                        .await
                    }
                }
            })
            .await?;
        tracing::Span::current().record("released", released);
        Ok(u64::try_from(released).unwrap_or(u64::MAX))
    }

    #[tracing::instrument(level = "debug", name = "sqlite.backlog", skip_all)]
    async fn inbox_backlog(&self) -> Result<Backlog, StoreError> {
        let ((pending, oldest), (retrying, oldest_retrying)) = self
            .run(Access::Read, |mut conn| async move {
                let all = inbox_rows::table
                    .select((
                        diesel::dsl::count_star(),
                        diesel::dsl::min(inbox_rows::requested_at),
                    ))
                    .get_result::<(i64, Option<i64>)>(&mut conn)
                    .await?;
                let retrying = inbox_rows::table
                    .filter(inbox_rows::attempts.gt(0))
                    .select((
                        diesel::dsl::count_star(),
                        diesel::dsl::min(inbox_rows::requested_at),
                    ))
                    .get_result::<(i64, Option<i64>)>(&mut conn)
                    .await?;
                Ok::<_, diesel::result::Error>((all, retrying))
            })
            .await?;
        Ok(Backlog {
            pending: u64::try_from(pending).unwrap_or(0),
            oldest: oldest.map(Timestamp::from_unix_micros),
            retrying: u64::try_from(retrying).unwrap_or(0),
            oldest_retrying: oldest_retrying.map(Timestamp::from_unix_micros),
        })
    }

    #[tracing::instrument(level = "debug", name = "sqlite.failures", skip_all, fields(limit = query.limit))]
    async fn dead_letters(&self, query: &FailureQuery) -> Result<Vec<DeadLetter>, StoreError> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let query = query.clone();
        let rows = self
            .run(Access::Read, move |mut conn| async move {
                conn.spawn_blocking(move |conn| inbox::list(conn, &query))
                    .await
            })
            .await?;
        rows.into_iter()
            .map(|(seq, id, code, reason, at, attempts)| {
                Ok(DeadLetter {
                    seq,
                    record: FailureRecord {
                        id: stored_id(id)?,
                        code,
                        reason,
                        at: Timestamp::from_unix_micros(at),
                        attempts: stored_count(attempts),
                    },
                })
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", name = "sqlite.replay_failures", skip_all)]
    async fn replay(&self, filter: &FailureFilter, at: Timestamp) -> Result<u64, StoreError> {
        let filter = filter.clone();
        let at = at.as_unix_micros();
        self.run(Access::Write, move |mut conn| async move {
            conn.spawn_blocking(move |conn| inbox::replay(conn, &filter, at))
                .await
        })
        .await
    }

    #[tracing::instrument(level = "debug", name = "sqlite.purge_failures", skip_all)]
    async fn purge(&self, filter: &FailureFilter) -> Result<u64, StoreError> {
        let filter = filter.clone();
        self.run(Access::Write, move |mut conn| async move {
            conn.spawn_blocking(move |conn| inbox::purge(conn, &filter))
                .await
        })
        .await
    }
}

crate::delegate_ports!(SqliteStore);

/// One row of `objects` as read.
#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = objects, check_for_backend(Sqlite))]
struct ObjectRow {
    id: i64,
    last_seen: i64,
    expires_at: i64,
}

impl ObjectRow {
    fn into_domain(self) -> Result<StoredObject, StoreError> {
        let id = ObjectId::new(self.id)
            .map_err(|err| StoreError::Query(format!("stored object id {}: {err}", self.id)))?;
        Ok(StoredObject {
            id,
            last_seen: Timestamp::from_unix_micros(self.last_seen),
            expires_at: Timestamp::from_unix_micros(self.expires_at),
        })
    }
}

/// Opens a connection to the database file at `path` and applies [`SESSION_SETTINGS`]:
/// the one setup hook of every connection, pooled or not.
fn connect(path: &str) -> ConnectionResult<SqliteConnection> {
    use diesel::connection::SimpleConnection;

    let mut conn = SqliteConnection::establish(path)?;
    conn.batch_execute(SESSION_SETTINGS)
        .map_err(ConnectionError::CouldntSetupConfiguration)?;
    Ok(conn)
}

/// Creates the directory and the file if missing and applies the pending migrations;
/// returns the versions it applied. Blocking.
fn prepare(path: &Path) -> Result<Vec<String>, OpenError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| OpenError::CreateDirectory {
            path: parent.to_owned(),
            source,
        })?;
    }
    let connect_error = |source| OpenError::Connect {
        path: path.to_owned(),
        source,
    };
    let url = path
        .to_str()
        .ok_or(OpenError::InvalidSqliteUrl("the path is not valid utf-8"))?;
    let mut conn = connect(url).map_err(connect_error)?;
    let applied = conn
        .run_pending_migrations(MIGRATIONS)
        .map_err(OpenError::Migrate)?;
    Ok(applied.iter().map(ToString::to_string).collect())
}

/// Maps a diesel error: lock contention, I/O trouble and lost connections mean the
/// database is unavailable (try again later); anything else is a query error.
fn query_error(err: diesel::result::Error) -> StoreError {
    crate::errors::classify(err, is_unavailable)
}

fn is_unavailable(err: &diesel::result::Error) -> bool {
    // SQLite's own wording (sqlite3_errstr), which is all diesel keeps of the error code:
    // SQLITE_BUSY and SQLITE_LOCKED ("database is locked", "database table is locked"),
    // SQLITE_CANTOPEN, SQLITE_IOERR, SQLITE_FULL and SQLITE_READONLY.
    const UNAVAILABLE: [&str; 5] = [
        "is locked",
        "unable to open database file",
        "disk I/O error",
        "database or disk is full",
        "readonly database",
    ];
    match err {
        diesel::result::Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            _,
        ) => true,
        diesel::result::Error::DatabaseError(_, info) => {
            let message = info.message();
            UNAVAILABLE.iter().any(|needle| message.contains(needle))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
