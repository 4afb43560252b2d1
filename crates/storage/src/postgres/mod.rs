//! The PostgreSQL store: diesel-async's `AsyncPgConnection` pooled by deadpool.
//!
//! The driver is tokio-postgres (pure Rust, no libpq). Connections are TCP or Unix sockets,
//! over TLS (rustls) as the url's `sslmode` says (`connector`): every connection, pooled
//! or made by the background reconnect, goes through the same [`connect`].

mod connector;
mod inbox;
mod schema;
mod upsert;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use deadpool::managed::{Hook, HookError, HookFuture, Metrics, QueueMode};
use diesel::pg::Pg;
use diesel::pg::data_types::PgTimestamp;
use diesel::prelude::*;
use diesel::result::{ConnectionError, DatabaseErrorKind};
use diesel::sql_types::Integer;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::{Object, Pool};

use crate::errors::pool_error;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use domain::ports::{
    Backlog, Claim, Completion, DeadLetter, FailureFilter, FailureQuery, FailureRecord, Requested,
};
use domain::{ObjectId, StoreError, StoredObject, Timestamp};
use tokio_postgres::config::Host;
use tracing::Instrument;

use self::connector::PgTls;
use self::inbox::{EnqueueBatch, EnqueueTracedBatch};
use self::schema::{inbox as inbox_rows, objects};
use self::upsert::UpsertBatch;
use crate::inbox::{
    ClaimedRow, Enqueue, Settlement, claims_in_order, count_column, sql_limit, stored_count,
    stored_id,
};
use crate::{OpenError, StoreOptions};

/// The migrations of the PostgreSQL backend, compiled into the binary.
const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// The key of the session-level advisory lock held while migrating (ASCII `cb_migra`), so
/// that instances starting at the same time migrate one after the other.
const MIGRATION_LOCK: i64 = 0x6362_5f6d_6967_7261;

/// PostgreSQL counts time from 2000-01-01 00:00:00 UTC, `Timestamp` from the Unix epoch:
/// the difference in microseconds.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// How to open a connection: the parsed url and the session settings.
///
/// It holds the password (to reconnect); tokio-postgres's `Config` redacts it from its
/// `Debug` output and nothing here prints the url.
struct Settings {
    config: tokio_postgres::Config,
    /// The TLS mode and connector (`sslmode=disable` too: then it is never asked).
    tls: PgTls,
    connect_timeout: Duration,
    /// The session settings, as one batch of statements.
    session: String,
    /// Where the server is, for errors and logs: hosts, ports and database, no user or
    /// password.
    server: String,
}

impl Settings {
    fn new(mut config: tokio_postgres::Config, tls: PgTls, options: &StoreOptions) -> Self {
        config.connect_timeout(options.connect_timeout);
        config.ssl_mode(tls.driver_mode());
        let server = describe_server(&config);
        Self {
            config,
            tls,
            connect_timeout: options.connect_timeout,
            session: session_settings(options.statement_timeout),
            server,
        }
    }
}

/// The session settings of every connection, applied in [`connect`] and nowhere else.
///
/// `synchronous_commit = on` makes a commit wait until its WAL is flushed (the server
/// default, set here so a changed default cannot weaken the durability of accepted
/// writes); the time zone is UTC so that anything printing `timestamptz` prints UTC.
fn session_settings(statement_timeout: Duration) -> String {
    // PostgreSQL counts this timeout in whole milliseconds and reads 0 as "no timeout": a
    // non-zero duration rounds up so it never turns into "no timeout" by accident.
    let millis = statement_timeout.as_nanos().div_ceil(1_000_000);
    format!(
        "SET statement_timeout = {millis}; \
         SET application_name = 'callback-service'; \
         SET synchronous_commit = on; \
         SET TIME ZONE 'UTC';"
    )
}

/// `host:port/database` of every host the url names; never the user or the password.
fn describe_server(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost".to_owned()
    } else {
        hosts.join(",")
    };
    let database = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{hosts}/{database}")
}

/// Opens a connection and applies the session settings: the one setup hook of every
/// connection, pooled or not, bounded by the connect timeout as a whole (tokio-postgres's
/// own timeout covers only the TCP connect, not the handshake).
async fn connect(settings: &Settings) -> ConnectionResult<AsyncPgConnection> {
    establish(settings).await.map_err(|failure| failure.error)
}

/// Why a connection could not be made, and whether trying again later may succeed.
struct ConnectFailure {
    error: ConnectionError,
    /// The server was not reachable or not ready (refused, reset, timed out, starting up,
    /// shutting down, out of connection slots), as opposed to refusing us (password,
    /// missing database, bad settings), which waiting does not fix.
    transient: bool,
}

/// [`connect`], telling a server that is away from one that refuses us.
async fn establish(settings: &Settings) -> Result<AsyncPgConnection, ConnectFailure> {
    let attempt = async {
        let (client, connection) = settings
            .config
            .connect(settings.tls.clone())
            .await
            .map_err(|err| ConnectFailure {
                transient: is_transient(&err),
                error: ConnectionError::BadConnection(describe_driver_error(&err)),
            })?;
        let permanent = |error| ConnectFailure {
            error,
            transient: false,
        };
        let mut conn = AsyncPgConnection::try_from_client_and_connection(client, connection)
            .await
            .map_err(permanent)?;
        conn.batch_execute(&settings.session)
            .await
            .map_err(|err| permanent(ConnectionError::CouldntSetupConfiguration(err)))?;
        Ok(conn)
    };
    match tokio::time::timeout(settings.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectFailure {
            error: ConnectionError::BadConnection(format!(
                "no connection within {:?}",
                settings.connect_timeout
            )),
            transient: true,
        }),
    }
}

/// Whether a failed connect may succeed later: no answer from the server at all (an I/O
/// error), or the server saying it cannot take us *now*: starting up or shutting down
/// (class 57P), out of connection slots (53300). A refused TLS negotiation (certificate,
/// a server without TLS under `require`) is not: the settings must change.
fn is_transient(err: &tokio_postgres::Error) -> bool {
    match err.as_db_error() {
        None => !connector::is_permanent(err),
        Some(db) => {
            let code = db.code().code();
            code.starts_with("57P") || code == "53300"
        }
    }
}

/// Whether the schema is in place; until it is, every call answers `Unavailable` with the
/// reason, so the service runs (health 503, callbacks 503) while PostgreSQL is away at
/// start, and recovers by itself.
#[derive(Debug, Default)]
struct Readiness {
    ready: AtomicBool,
    /// Why the database is not ready yet; empty once it is.
    waiting_for: Mutex<String>,
}

impl Readiness {
    fn check(&self) -> Result<(), StoreError> {
        if AtomicBool::load(&self.ready, Ordering::Acquire) {
            return Ok(());
        }
        let reason = self
            .waiting_for
            .lock()
            .map(|reason| reason.clone())
            .unwrap_or_default();
        Err(StoreError::Unavailable(format!(
            "database not ready (schema not migrated yet): {reason}"
        )))
    }

    fn waiting_for(&self, reason: String) {
        if let Ok(mut waiting_for) = self.waiting_for.lock() {
            *waiting_for = reason;
        }
    }

    fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
        self.waiting_for(String::new());
    }
}

/// Connects and migrates, keeping only a transient failure's description.
async fn connect_and_migrate(settings: &Settings) -> Result<Vec<String>, (OpenError, bool)> {
    let conn = establish(settings).await.map_err(|failure| {
        let error = OpenError::PostgresConnect {
            server: settings.server.clone(),
            source: failure.error,
        };
        (error, failure.transient)
    })?;
    migrate(conn).await.map_err(|err| (err, false))
}

/// The chain of `err`'s messages, `: `-separated.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut chain = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    chain
}

/// The first pause between two attempts to reach a database that was away at start; it
/// doubles up to [`MAX_RECONNECT_PAUSE`].
const FIRST_RECONNECT_PAUSE: Duration = Duration::from_millis(250);
const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(5);

/// Tries to connect and migrate until it works, with a capped exponential backoff, one log
/// line per attempt; gives up when the store is gone.
async fn migrate_when_reachable(settings: Arc<Settings>, readiness: Weak<Readiness>) {
    let mut pause = FIRST_RECONNECT_PAUSE;
    loop {
        tokio::time::sleep(pause).await;
        let Some(readiness) = readiness.upgrade() else {
            return; // the store was dropped
        };
        match connect_and_migrate(&settings).await {
            Ok(applied) => {
                readiness.set_ready();
                tracing::info!(server = %settings.server, migrations_applied = ?applied,
                    "postgresql reachable again; the store is ready");
                return;
            }
            Err((err, transient)) => {
                let cause = error_chain(&err);
                pause = (pause * 2).min(MAX_RECONNECT_PAUSE);
                if transient {
                    tracing::warn!(server = %settings.server, error = %cause, retry_in = ?pause,
                        "postgresql still not reachable; callbacks get 503 until it is");
                } else {
                    tracing::error!(server = %settings.server, error = %cause, retry_in = ?pause,
                        "postgresql refuses the connection or the migration failed; retrying");
                }
                readiness.waiting_for(cause);
            }
        }
    }
}

/// How long a pooled connection may sit unused before a checkout asks it `SELECT 1`.
///
/// A busy connection is not asked: that round trip was half of those the
/// group-commit writer sends. One whose server went away within this window fails the
/// caller's statement instead, as any statement in flight during an outage does.
const VERIFY_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Checkout hook: `SELECT 1` on a connection unused for [`VERIFY_IDLE_AFTER`] or longer;
/// one that fails it, or gives no answer within `timeout` (a peer gone without closing the
/// socket), is dropped and the pool takes (or opens) another.
fn verify_if_idle<'a>(
    conn: &'a mut AsyncPgConnection,
    metrics: &'a Metrics,
    timeout: Duration,
) -> HookFuture<'a, diesel_async::pooled_connection::PoolError> {
    Box::pin(async move {
        if metrics.last_used() < VERIFY_IDLE_AFTER {
            return Ok(());
        }
        let ping = diesel::select(1_i32.into_sql::<Integer>()).get_result::<i32>(conn);
        match tokio::time::timeout(timeout, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(HookError::Backend(
                diesel_async::pooled_connection::PoolError::QueryError(err),
            )),
            Err(_) => Err(HookError::message("no answer to SELECT 1 in time")),
        }
    })
}

/// A tokio-postgres error with its cause: the server's message and SQLSTATE, or the I/O
/// error. tokio-postgres never puts the password in either.
fn describe_driver_error(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    let described = match std::error::Error::source(err) {
        Some(cause) => format!("{err}: {cause}"),
        None => err.to_string(),
    };
    match connector::hint(err) {
        Some(hint) => format!("{described} ({hint})"),
        None => described,
    }
}

/// The [`ObjectStore`] and [`Inbox`] on a PostgreSQL database.
///
/// Every call runs on its own tokio task with a pooled connection, so a caller that gives
/// up (a timeout, a dropped request) never leaves a statement half sent or a transaction
/// open on a connection that goes back to the pool. Connections are checked with
/// `SELECT 1` when taken from the pool, so after an outage (a restarted server, killed
/// sessions) the pool replaces them by itself.
pub struct PgStore {
    pool: Pool<AsyncPgConnection>,
    server: String,
    gauges: Arc<crate::metrics::PoolGauges>,
    readiness: Arc<Readiness>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("server", &self.server)
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database named by `url` (`postgres://` or `postgresql://`, any
    /// form tokio-postgres reads) and applies the pending migrations.
    ///
    /// Errors name the server (hosts, ports, database) but never the user's password.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self, OpenError> {
        Self::open_with(url, options, false).await
    }

    /// [`PgStore::open`], except that a server that cannot be reached *now* (refused,
    /// timed out, starting up) is not an error: the store is returned at once, answers
    /// `Unavailable` naming the cause, and connects and migrates in the background with a
    /// capped backoff, so a service started before its database runs, reports itself
    /// unhealthy, and recovers by itself. A server that refuses us (password, missing
    /// database) still fails here: waiting would not fix it.
    pub async fn open_eventually(url: &str, options: &StoreOptions) -> Result<Self, OpenError> {
        Self::open_with(url, options, true).await
    }

    async fn open_with(url: &str, options: &StoreOptions, wait: bool) -> Result<Self, OpenError> {
        if options.max_connections == 0 {
            return Err(OpenError::InvalidOptions(
                "max_connections must be at least 1",
            ));
        }
        let (config, tls) = parse_url(url, &options.tls)?;
        let settings = Arc::new(Settings::new(config, tls, options));
        let tls = settings.tls.describe();
        let server = settings.server.clone();
        let readiness = Arc::new(Readiness::default());
        let applied = match connect_and_migrate(&settings).await {
            Ok(applied) => {
                readiness.set_ready();
                Some(applied)
            }
            Err((err, true)) if wait => {
                let cause = error_chain(&err);
                tracing::warn!(server = %server, error = %cause,
                    "postgresql not reachable at start; retrying in the background, callbacks get 503 until it is");
                readiness.waiting_for(cause);
                tokio::spawn(migrate_when_reachable(
                    Arc::clone(&settings),
                    Arc::downgrade(&readiness),
                ));
                None
            }
            Err((err, _)) => return Err(err),
        };

        let mut config = ManagerConfig::<AsyncPgConnection>::default();
        // A connection whose socket closed (server restarted, session killed) is dropped
        // at checkout by the manager's own broken-connection check; one that sat idle for
        // a while is also asked `SELECT 1` first (see `verify_if_idle`), so one lost
        // silently is replaced before a caller's statement fails on it.
        config.recycling_method = RecyclingMethod::Fast;
        let setup = Arc::clone(&settings);
        config.custom_setup = Box::new(move |_url: &str| {
            let settings = Arc::clone(&setup);
            Box::pin(async move { connect(&settings).await })
        });
        // The manager's url is only handed back to `custom_setup`, which ignores it: it
        // gets the server's description, so the password lives in `Settings` alone.
        let manager = AsyncDieselConnectionManager::new_with_config(server.clone(), config);
        // The pool's recycle timeout does not cover its hooks: the idle check has its own.
        let verify_timeout = options.connect_timeout;
        let pool = Pool::builder(manager)
            .max_size(options.max_connections)
            .wait_timeout(Some(options.wait_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            // The most recently returned connection first: under load the same few stay
            // busy (and skip the idle check), the rest idle and are checked before reuse.
            .queue_mode(QueueMode::Lifo)
            .pre_recycle(Hook::async_fn(move |conn, metrics| {
                verify_if_idle(conn, metrics, verify_timeout)
            }))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(OpenError::Pool)?;

        let store = Self {
            pool,
            server,
            gauges: Arc::new(crate::metrics::PoolGauges::register()),
            readiness,
        };
        if applied.is_some() {
            store.ping_database().await.map_err(OpenError::Check)?;
        }
        tracing::info!(
            server = %store.server,
            tls,
            max_connections = options.max_connections,
            migrations_applied = ?applied,
            ready = applied.is_some(),
            "postgresql store opened"
        );
        Ok(store)
    }

    /// Runs `op` with a pooled connection on a task of its own and waits for its result.
    ///
    /// The task owns the connection: if the caller stops waiting, the statement still
    /// finishes (or fails) and the connection goes back to the pool in a known state.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Object<AsyncPgConnection>) -> Fut + Send + 'static,
        Fut: Future<Output = QueryResult<T>> + Send + 'static,
    {
        self.readiness.check()?;
        let pool = self.pool.clone();
        let gauges = Arc::clone(&self.gauges);
        let task = tokio::spawn(
            async move {
                let conn = pool.get().await;
                gauges.observe(&pool.status());
                let result = op(conn.map_err(pool_error)?).await;
                // The connection is back in the pool by now.
                gauges.observe(&pool.status());
                result.map_err(query_error)
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

    #[tracing::instrument(level = "debug", name = "postgres.upsert_seen", skip_all, fields(rows = batch.len()))]
    async fn upsert(&self, batch: &[StoredObject]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let rows = batch
            .iter()
            .map(|object| {
                Ok((
                    object.id.get(),
                    to_pg(object.last_seen)?,
                    to_pg(object.expires_at)?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let statement = UpsertBatch::new(rows);
        let expected = statement.len();
        let written = self
            .run(move |mut conn| async move { statement.execute(&mut conn).await })
            .await?;
        if written == expected {
            Ok(())
        } else {
            // Each id is named once, so every row is either inserted or updated.
            Err(StoreError::Query(format!(
                "upsert of {expected} rows wrote {written}"
            )))
        }
    }

    #[tracing::instrument(level = "debug", name = "postgres.delete_expired", skip_all, fields(cutoff = cutoff.as_unix_micros(), limit, deleted = tracing::field::Empty))]
    async fn delete_due(&self, cutoff: Timestamp, limit: usize) -> Result<u64, StoreError> {
        let cutoff = to_pg(cutoff)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let deleted = self
            .run(move |mut conn| async move {
                // `DELETE … WHERE id IN (SELECT id … ORDER BY expires_at LIMIT $2 FOR UPDATE
                // SKIP LOCKED)`: two sweepers never wait for each other or delete a row
                // twice, and a row an upsert is refreshing right now is left alone (the
                // next sweep sees its new expiry). The subquery reads the same table,
                // which diesel wants under an alias.
                let due_rows = diesel::alias!(objects as due);
                let due = due_rows
                    .select(due_rows.field(objects::id))
                    .filter(due_rows.field(objects::expires_at).le(cutoff))
                    .order(due_rows.field(objects::expires_at).asc())
                    .limit(limit)
                    .for_update()
                    .skip_locked();
                diesel::delete(objects::table.filter(objects::id.eq_any(due)))
                    .execute(&mut conn)
                    .await
            })
            .await?;
        tracing::Span::current().record("deleted", deleted);
        Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
    }

    #[tracing::instrument(level = "debug", name = "postgres.next_expiry", skip_all)]
    async fn earliest_expiry(&self) -> Result<Option<Timestamp>, StoreError> {
        let earliest = self
            .run(|mut conn| async move {
                objects::table
                    .select(diesel::dsl::min(objects::expires_at))
                    .get_result::<Option<PgTimestamp>>(&mut conn)
                    .await
            })
            .await?;
        earliest.map(from_pg).transpose()
    }

    #[tracing::instrument(level = "debug", name = "postgres.get", skip_all, fields(object_id = id.get()))]
    async fn get_live(
        &self,
        id: ObjectId,
        now: Timestamp,
    ) -> Result<Option<StoredObject>, StoreError> {
        let now = to_pg(now)?;
        let row = self
            .run(move |mut conn| async move {
                objects::table
                    .find(id.get())
                    .filter(objects::expires_at.gt(now))
                    .select(ObjectRow::as_select())
                    .get_result(&mut conn)
                    .await
                    .optional()
            })
            .await?;
        row.map(ObjectRow::into_domain).transpose()
    }

    #[tracing::instrument(level = "debug", name = "postgres.list", skip_all, fields(after = after.map(ObjectId::get), limit))]
    async fn list_live(
        &self,
        now: Timestamp,
        after: Option<ObjectId>,
        limit: usize,
    ) -> Result<Vec<StoredObject>, StoreError> {
        let now = to_pg(now)?;
        // Ids are never negative, so "no cursor" is "after -1": one statement shape, which
        // diesel-async prepares once per connection.
        let after = after.map_or(-1, ObjectId::get);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .run(move |mut conn| async move {
                objects::table
                    .filter(objects::id.gt(after))
                    .filter(objects::expires_at.gt(now))
                    .order(objects::id.asc())
                    .limit(limit)
                    .select(ObjectRow::as_select())
                    .load(&mut conn)
                    .await
            })
            .await?;
        rows.into_iter().map(ObjectRow::into_domain).collect()
    }

    #[tracing::instrument(level = "debug", name = "postgres.ping", skip_all)]
    async fn ping_database(&self) -> Result<(), StoreError> {
        let one = self
            .run(|mut conn| async move {
                diesel::select(1_i32.into_sql::<Integer>())
                    .get_result::<i32>(&mut conn)
                    .await
            })
            .await?;
        if one == 1 {
            Ok(())
        } else {
            Err(StoreError::Query(format!("SELECT 1 answered {one}")))
        }
    }

    #[tracing::instrument(level = "debug", name = "postgres.enqueue", skip_all, fields(ids = requests.len()))]
    async fn enqueue_ids(&self, requests: &[Requested], at: Timestamp) -> Result<(), StoreError> {
        if requests.is_empty() {
            return Ok(());
        }
        let enqueue = Enqueue::new(requests);
        let at = to_pg(at)?;
        let expected = enqueue.ids.len();
        // One statement is one transaction; it returns once the commit is flushed
        // (`synchronous_commit = on`).
        let written = if enqueue.traces.is_empty() {
            let statement = EnqueueBatch::new(enqueue.ids, at);
            self.run(move |mut conn| async move { statement.execute(&mut conn).await })
                .await?
        } else {
            let statement = EnqueueTracedBatch::new(enqueue, at);
            self.run(move |mut conn| async move { statement.execute(&mut conn).await })
                .await?
        };
        if written == expected {
            Ok(())
        } else {
            // Each id is named once, so every row is either inserted or bumped.
            Err(StoreError::Query(format!(
                "enqueue of {expected} ids wrote {written} rows"
            )))
        }
    }

    #[tracing::instrument(level = "debug", name = "postgres.claim", skip_all, fields(owner, limit, claimed = tracing::field::Empty))]
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
        let now = to_pg(now)?;
        let lease_until = to_pg(lease_until)?;
        let limit = sql_limit(limit);
        let rows = self
            .run(move |mut conn| async move {
                // `UPDATE … WHERE object_id IN (SELECT … ORDER BY requested_at LIMIT $n
                // FOR UPDATE SKIP LOCKED) RETURNING …`: claimers on several instances never
                // wait for each other or lease the same id; a row another claimer has just
                // leased is skipped while locked and fails the lease test once committed.
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
                    .limit(limit)
                    .for_update()
                    .skip_locked();
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
                    .get_results::<ClaimedRow<PgTimestamp>>(&mut conn)
                    .await
            })
            .await?;
        tracing::Span::current().record("claimed", rows.len());
        claims_in_order(
            rows.into_iter()
                .map(|(id, generation, at, trace, attempts)| {
                    Ok((id, generation, from_pg(at)?, trace, attempts))
                })
                .collect::<Result<_, StoreError>>()?,
        )
    }

    #[tracing::instrument(level = "debug", name = "postgres.complete", skip_all, fields(claims = done.len()))]
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
        let online = settlement
            .online
            .iter()
            .map(|object| {
                Ok((
                    object.id.get(),
                    to_pg(object.last_seen)?,
                    to_pg(object.expires_at)?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let failures = settlement
            .failures
            .iter()
            .map(|record| {
                Ok((
                    record.id.get(),
                    record.code.clone(),
                    record.reason.clone(),
                    to_pg(record.at)?,
                    count_column(record.attempts),
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let completion = inbox::Completion {
            owner: owner.to_owned(),
            online: (!online.is_empty()).then(|| UpsertBatch::new(online)),
            failures,
            settlement,
            again_from: to_pg(again_from)?,
        };
        self.run(move |mut conn| async move { completion.execute(&mut conn).await })
            .await
    }

    #[tracing::instrument(level = "debug", name = "postgres.renew", skip_all, fields(owner, renewed = tracing::field::Empty))]
    async fn renew_leases(&self, owner: &str, lease_until: Timestamp) -> Result<u64, StoreError> {
        let owner = owner.to_owned();
        let until = to_pg(lease_until)?;
        let renewed = self
            .run(move |mut conn| async move {
                diesel::update(inbox_rows::table.filter(inbox_rows::lease_owner.eq(owner)))
                    .set(inbox_rows::lease_until.eq(Some(until)))
                    .execute(&mut conn)
                    .await
            })
            .await?;
        tracing::Span::current().record("renewed", renewed);
        Ok(u64::try_from(renewed).unwrap_or(u64::MAX))
    }

    #[tracing::instrument(level = "debug", name = "postgres.release", skip_all, fields(owner, released = tracing::field::Empty))]
    async fn release_leases(&self, owner: Option<&str>) -> Result<u64, StoreError> {
        let owner = owner.map(str::to_owned);
        let released = self
            .run(move |mut conn| async move {
                let free = (
                    inbox_rows::lease_owner.eq(None::<String>),
                    inbox_rows::lease_until.eq(None::<PgTimestamp>),
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

    #[tracing::instrument(level = "debug", name = "postgres.backlog", skip_all)]
    async fn inbox_backlog(&self) -> Result<Backlog, StoreError> {
        let ((pending, oldest), (retrying, oldest_retrying)) = self
            .run(|mut conn| async move {
                let all = inbox_rows::table
                    .select((
                        diesel::dsl::count_star(),
                        diesel::dsl::min(inbox_rows::requested_at),
                    ))
                    .get_result::<(i64, Option<PgTimestamp>)>(&mut conn)
                    .await?;
                let retrying = inbox_rows::table
                    .filter(inbox_rows::attempts.gt(0))
                    .select((
                        diesel::dsl::count_star(),
                        diesel::dsl::min(inbox_rows::requested_at),
                    ))
                    .get_result::<(i64, Option<PgTimestamp>)>(&mut conn)
                    .await?;
                Ok((all, retrying))
            })
            .await?;
        Ok(Backlog {
            pending: u64::try_from(pending).unwrap_or(0),
            oldest: oldest.map(from_pg).transpose()?,
            retrying: u64::try_from(retrying).unwrap_or(0),
            oldest_retrying: oldest_retrying.map(from_pg).transpose()?,
        })
    }

    #[tracing::instrument(level = "debug", name = "postgres.failures", skip_all, fields(limit = query.limit))]
    async fn dead_letters(&self, query: &FailureQuery) -> Result<Vec<DeadLetter>, StoreError> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let selected = inbox::Selected::new(&query.filter)?;
        let before = query.before;
        let limit = sql_limit(query.limit);
        let rows =
            self.run(move |mut conn| async move {
                inbox::list(&mut conn, selected, before, limit).await
            })
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(DeadLetter {
                    seq: row.seq,
                    record: FailureRecord {
                        id: stored_id(row.object_id)?,
                        code: row.code,
                        reason: row.reason,
                        at: from_pg(row.failed_at)?,
                        attempts: stored_count(row.attempts),
                    },
                })
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", name = "postgres.replay_failures", skip_all)]
    async fn replay(&self, filter: &FailureFilter, at: Timestamp) -> Result<u64, StoreError> {
        let selected = inbox::Selected::new(filter)?;
        let at = to_pg(at)?;
        self.run(move |mut conn| async move { inbox::replay(&mut conn, selected, at).await })
            .await
    }

    #[tracing::instrument(level = "debug", name = "postgres.purge_failures", skip_all)]
    async fn purge(&self, filter: &FailureFilter) -> Result<u64, StoreError> {
        let selected = inbox::Selected::new(filter)?;
        self.run(move |mut conn| async move { inbox::purge(&mut conn, selected).await })
            .await
    }
}

crate::delegate_ports!(PgStore);

/// One row of `objects` as read.
#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = objects, check_for_backend(Pg))]
struct ObjectRow {
    id: i64,
    last_seen: PgTimestamp,
    expires_at: PgTimestamp,
}

impl ObjectRow {
    fn into_domain(self) -> Result<StoredObject, StoreError> {
        let id = ObjectId::new(self.id)
            .map_err(|err| StoreError::Query(format!("stored object id {}: {err}", self.id)))?;
        Ok(StoredObject {
            id,
            last_seen: from_pg(self.last_seen)?,
            expires_at: from_pg(self.expires_at)?,
        })
    }
}

/// A `Timestamp` as PostgreSQL's microseconds since 2000-01-01 UTC.
fn to_pg(t: Timestamp) -> Result<PgTimestamp, StoreError> {
    t.as_unix_micros()
        .checked_sub(PG_EPOCH_UNIX_MICROS)
        .map(PgTimestamp)
        .ok_or_else(|| {
            StoreError::Query(format!(
                "timestamp {} µs is out of postgresql's range",
                t.as_unix_micros()
            ))
        })
}

/// PostgreSQL's microseconds since 2000-01-01 UTC as a `Timestamp`.
fn from_pg(t: PgTimestamp) -> Result<Timestamp, StoreError> {
    t.0.checked_add(PG_EPOCH_UNIX_MICROS)
        .map(Timestamp::from_unix_micros)
        .ok_or_else(|| StoreError::Query(format!("stored timestamp {} is out of range", t.0)))
}

/// Applies the pending migrations on `conn` under the migration lock; returns the versions
/// it applied.
///
/// diesel's migration harness is synchronous: it runs on a blocking thread through
/// `AsyncConnectionWrapper`. The lock is a session-level advisory lock, so a second
/// instance starting at the same time waits (within `statement_timeout`) and then finds
/// nothing left to do, and a process that dies while migrating releases it with its
/// connection. The migrations themselves run without a statement timeout: a long one is
/// not cut short half-way.
async fn migrate(conn: AsyncPgConnection) -> Result<Vec<String>, OpenError> {
    use diesel::connection::SimpleConnection;

    let migrate_error = |err: diesel::result::Error| OpenError::Migrate(Box::new(err));
    tokio::task::spawn_blocking(move || {
        let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
        SimpleConnection::batch_execute(
            &mut conn,
            &format!("SELECT pg_advisory_lock({MIGRATION_LOCK}); SET statement_timeout = 0;"),
        )
        .map_err(migrate_error)?;
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map(|versions| versions.iter().map(ToString::to_string).collect())
            .map_err(OpenError::Migrate);
        // Unlocking is a courtesy to the next instance: closing the connection, which
        // happens right after, releases the lock too.
        let unlocked = SimpleConnection::batch_execute(
            &mut conn,
            &format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"),
        )
        .map_err(migrate_error);
        let applied = applied?;
        unlocked?;
        Ok(applied)
    })
    .await
    .map_err(OpenError::Task)?
}

/// The driver's configuration of `url` and the TLS it names (with `tls_files`), its TLS
/// keys taken out first: tokio-postgres refuses most of them.
pub(crate) fn parse_url(
    url: &str,
    tls_files: &crate::PgTlsOptions,
) -> Result<(tokio_postgres::Config, PgTls), OpenError> {
    let (rest, url_tls) = connector::take_tls_params(&lowercase_scheme(url));
    let config = rest
        .parse()
        .map_err(|err| OpenError::InvalidPostgresUrl(url_error(&err)))?;
    Ok((config, PgTls::resolve(&url_tls, tls_files)?))
}

/// `url` with its scheme in lower case, as tokio-postgres wants it (`POSTGRES://…` is
/// as valid a url as `postgres://…`).
fn lowercase_scheme(url: &str) -> std::borrow::Cow<'_, str> {
    match url.split_once("://") {
        Some((scheme, rest)) if scheme.chars().any(|c| c.is_ascii_uppercase()) => {
            format!("{}://{rest}", scheme.to_ascii_lowercase()).into()
        }
        _ => url.into(),
    }
}

/// Describes why a url does not parse, without repeating any part of it: tokio-postgres
/// names only an option's key, but a malformed url can put anything where a key belongs.
fn url_error(err: &tokio_postgres::Error) -> &'static str {
    let cause = std::error::Error::source(err)
        .map(ToString::to_string)
        .unwrap_or_default();
    if cause.starts_with("unknown option") {
        "it has an unknown option"
    } else if cause.starts_with("invalid value for option `port`") {
        "its port is not a number"
    } else if cause.starts_with("invalid value for option") {
        "an option has an invalid value"
    } else {
        "it is not a postgresql connection url"
    }
}

/// Maps a diesel error: a lost or refused connection, a server going down, a statement
/// cancelled by its timeout and transient conflicts mean the database is unavailable (try
/// again later); anything else is a query error.
fn query_error(err: diesel::result::Error) -> StoreError {
    crate::errors::classify(err, is_unavailable)
}

fn is_unavailable(err: &diesel::result::Error) -> bool {
    use diesel::result::Error::DatabaseError;

    // diesel-async keeps the server's message but not its SQLSTATE, so the classes are
    // recognised by PostgreSQL's (English) wording:
    // - 57014 query_canceled (statement timeout, pg_cancel_backend) and 55P03 lock timeout:
    //   "canceling statement due to …"
    // - 57P01 admin_shutdown, 57P02 crash_shutdown, 57P05 idle session timeout:
    //   "terminating connection …"
    // - 57P03 cannot_connect_now: "the database system is starting up / shutting down / …"
    // - 53300 too_many_connections: "sorry, too many clients already", "remaining
    //   connection slots are reserved …", "too many connections for role / database …"
    // - 40P01 deadlock_detected and 40001 serialization_failure (diesel's
    //   `SerializationFailure`): transient conflicts that succeed when tried again
    // - 25006 read_only_sql_transaction (diesel's `ReadOnlyTransaction`): the server is a
    //   standby now, as after a failover
    // A server whose `lc_messages` translates them loses only the first statement's
    // classification: a terminated session is closed, so what follows is a closed
    // connection, which needs no wording.
    const SERVER: [&str; 8] = [
        "canceling statement due to",
        "terminating connection",
        "the database system is",
        "sorry, too many clients",
        "remaining connection slots are reserved",
        "too many connections for",
        "deadlock detected",
        "could not serialize access",
    ];
    // tokio-postgres's own (never translated) words for a connection that failed or
    // closed, which diesel-async reports as "unable to send command"; its other errors
    // of that kind (parameters that do not serialise, unexpected columns) are ours.
    const DRIVER: [&str; 7] = [
        "error communicating with the server",
        "connection closed",
        "error connecting to server",
        "timeout waiting for server",
        "unexpected message from server",
        "error parsing response from server",
        "channel closed",
    ];
    match err {
        DatabaseError(
            DatabaseErrorKind::ClosedConnection
            | DatabaseErrorKind::SerializationFailure
            | DatabaseErrorKind::ReadOnlyTransaction,
            _,
        ) => true,
        DatabaseError(DatabaseErrorKind::UnableToSendCommand, info) => {
            let message = info.message();
            DRIVER.iter().any(|needle| message.starts_with(needle))
        }
        DatabaseError(_, info) => {
            let message = info.message();
            SERVER.iter().any(|needle| message.starts_with(needle))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
