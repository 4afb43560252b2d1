//! Unit tests of what the conformance suite cannot see: session settings, chunking,
//! atomicity, error mapping, cancellation.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Text};
use tempfile::TempDir;

use super::*;
use domain::ports::Outcome;

async fn fresh(options: &StoreOptions) -> (SqliteStore, TempDir) {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let store = SqliteStore::open(dir.path().join("unit.db"), options)
        .await
        .expect("open a fresh sqlite store");
    (store, dir)
}

fn object(raw: i64, last_seen: i64, expires_at: i64) -> StoredObject {
    StoredObject {
        id: ObjectId::new(raw).expect("non-negative"),
        last_seen: Timestamp::from_unix_micros(last_seen),
        expires_at: Timestamp::from_unix_micros(expires_at),
    }
}

async fn count(store: &SqliteStore) -> usize {
    store
        .list_live(Timestamp::from_unix_micros(0), None, usize::MAX)
        .await
        .expect("list")
        .len()
}

#[derive(QueryableByName)]
struct BusyTimeout {
    #[diesel(sql_type = BigInt)]
    timeout: i64,
}

#[derive(QueryableByName)]
struct JournalMode {
    #[diesel(sql_type = Text)]
    journal_mode: String,
}

#[derive(QueryableByName)]
struct Synchronous {
    #[diesel(sql_type = BigInt)]
    synchronous: i64,
}

#[derive(QueryableByName)]
struct ForeignKeys {
    #[diesel(sql_type = BigInt)]
    foreign_keys: i64,
}

#[tokio::test(flavor = "multi_thread")]
async fn every_pooled_connection_gets_the_session_settings() {
    let options = StoreOptions {
        max_connections: 3,
        ..StoreOptions::default()
    };
    let (store, _dir) = fresh(&options).await;
    // Hold all three at once, so they are three distinct connections.
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(store.pool.get().await.expect("pooled connection"));
    }
    for conn in &mut conns {
        let conn = &mut **conn;
        let busy: BusyTimeout = diesel::sql_query("PRAGMA busy_timeout")
            .get_result(conn)
            .await
            .expect("busy_timeout");
        let journal: JournalMode = diesel::sql_query("PRAGMA journal_mode")
            .get_result(conn)
            .await
            .expect("journal_mode");
        let sync: Synchronous = diesel::sql_query("PRAGMA synchronous")
            .get_result(conn)
            .await
            .expect("synchronous");
        let fk: ForeignKeys = diesel::sql_query("PRAGMA foreign_keys")
            .get_result(conn)
            .await
            .expect("foreign_keys");
        assert_eq!(busy.timeout, 5_000);
        assert_eq!(journal.journal_mode, "wal");
        assert_eq!(
            sync.synchronous, 1,
            "1 is NORMAL; the inbox enqueue commits under FULL"
        );
        assert_eq!(fk.foreign_keys, 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_larger_than_one_statement_is_written_whole() {
    let (store, _dir) = fresh(&StoreOptions::default()).await;
    let rows = i64::try_from(2 * write::MAX_ROWS_PER_STATEMENT + 1).expect("small");
    let batch: Vec<StoredObject> = (0..rows).map(|i| object(i, i, 1_000_000 + i)).collect();
    store.upsert(&batch).await.expect("upsert");
    let stored = store
        .list_live(Timestamp::from_unix_micros(0), None, usize::MAX)
        .await
        .expect("list");
    assert_eq!(stored, batch);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_chunk_is_one_insert_statement_in_one_transaction() {
    use std::sync::Mutex;

    use diesel::connection::{Instrumentation, InstrumentationEvent};

    let (store, _dir) = fresh(&StoreOptions::default()).await;
    let rows = 2 * write::MAX_ROWS_PER_STATEMENT + 1;
    let batch: Vec<write::Row> = (0..i64::try_from(rows).expect("small"))
        .map(|i| write::Row::from(&object(i, 1, 2)))
        .collect();
    let statements = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&statements);
    let mut conn = store.pool.get().await.expect("pooled connection");
    conn.spawn_blocking(move |conn| {
        conn.set_instrumentation(move |event: InstrumentationEvent<'_>| {
            if let InstrumentationEvent::StartQuery { query, .. } = event {
                let sql = query.to_string();
                let verb = sql.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
                seen.lock().expect("not poisoned").push(verb);
            }
        });
        let result = write::upsert(conn, &batch);
        conn.set_instrumentation(None::<Box<dyn Instrumentation>>);
        result
    })
    .await
    .expect("upsert");
    assert_eq!(
        *statements.lock().expect("not poisoned"),
        [
            "BEGIN IMMEDIATE",
            "INSERT INTO",
            "INSERT INTO",
            "INSERT INTO",
            "COMMIT"
        ]
    );
    drop(conn);
    assert_eq!(count(&store).await, rows);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_chunk_rolls_back_the_whole_batch() {
    let (store, dir) = fresh(&StoreOptions::default()).await;
    let poison = i64::try_from(write::MAX_ROWS_PER_STATEMENT + 5).expect("small");
    // A trigger makes one row of the second statement fail.
    let path = dir.path().join("unit.db");
    let mut conn = connect(path.to_str().expect("utf-8")).expect("direct connection");
    conn.batch_execute(&format!(
        "CREATE TRIGGER poison BEFORE INSERT ON objects WHEN NEW.id = {poison} \
         BEGIN SELECT RAISE(ABORT, 'poisoned row'); END;"
    ))
    .expect("create trigger");
    drop(conn);

    let batch: Vec<StoredObject> = (0..=poison).map(|i| object(i, 1, 2)).collect();
    let err = store
        .upsert(&batch)
        .await
        .expect_err("the poisoned row fails");
    assert!(
        matches!(&err, StoreError::Query(message) if message.contains("poisoned row")),
        "{err:?}"
    );
    assert_eq!(
        count(&store).await,
        0,
        "the first statement was not rolled back"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_too_long_for_a_connection_is_unavailable() {
    let options = StoreOptions {
        max_connections: 1,
        wait_timeout: Duration::from_millis(100),
        ..StoreOptions::default()
    };
    let (store, _dir) = fresh(&options).await;
    let held = store.pool.get().await.expect("the only connection");
    let err = store.ping_database().await.expect_err("no connection free");
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("timed out")),
        "{err:?}"
    );
    drop(held);
    store.ping_database().await.expect("free again");
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_too_long_for_the_write_lock_is_unavailable() {
    let options = StoreOptions {
        wait_timeout: Duration::from_millis(100),
        ..StoreOptions::default()
    };
    let (store, _dir) = fresh(&options).await;
    let turn = store.writes.lock().await;
    let err = store
        .upsert(&[object(1, 1, 2)])
        .await
        .expect_err("the write lock is held");
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("write lock")),
        "{err:?}"
    );
    // Reads do not take the write lock.
    store
        .list_live(Timestamp::from_unix_micros(0), None, 10)
        .await
        .expect("reads still work");
    drop(turn);
    store
        .upsert(&[object(1, 1, 2)])
        .await
        .expect("writes again");
}

fn synchronous(conn: &mut SqliteConnection) -> i64 {
    diesel::RunQueryDsl::get_result::<Synchronous>(diesel::sql_query("PRAGMA synchronous"), conn)
        .expect("synchronous")
        .synchronous
}

#[test]
fn a_durable_write_commits_under_full_and_leaves_the_connection_on_normal() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let path = dir.path().join("durable.db");
    let mut conn = connect(path.to_str().expect("utf-8")).expect("connection");
    conn.batch_execute("CREATE TABLE t (x INTEGER);")
        .expect("table");
    assert_eq!(synchronous(&mut conn), 1, "the session's NORMAL");

    let inside = inbox::durably(&mut conn, |conn| {
        conn.batch_execute("INSERT INTO t VALUES (1);")?;
        Ok(synchronous(conn))
    })
    .expect("committed");
    assert_eq!(inside, 2, "FULL while the durable write commits");
    assert_eq!(synchronous(&mut conn), 1, "NORMAL again after it");

    let failed = inbox::durably(&mut conn, |conn| {
        conn.batch_execute("INSERT INTO t VALUES (2);")?;
        conn.batch_execute("INSERT INTO missing VALUES (3);")
    });
    assert!(failed.is_err());
    assert_eq!(
        synchronous(&mut conn),
        1,
        "NORMAL again after a failed write"
    );
    let rows: i64 = diesel::RunQueryDsl::get_result(
        diesel::dsl::sql::<BigInt>("SELECT count(*) FROM t"),
        &mut conn,
    )
    .expect("count");
    assert_eq!(rows, 1, "the failed write was rolled back whole");
}

#[test]
fn a_real_busy_database_maps_to_unavailable() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let path = dir.path().join("busy.db");
    let path = path.to_str().expect("utf-8");
    let mut holder = connect(path).expect("first connection");
    holder
        .batch_execute("CREATE TABLE t (x INTEGER); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
        .expect("take the write lock");
    let mut other = SqliteConnection::establish(path).expect("second connection");
    other
        .batch_execute("PRAGMA busy_timeout = 0")
        .expect("no waiting");
    let err = other
        .batch_execute("BEGIN IMMEDIATE")
        .expect_err("the database is locked");
    assert!(
        matches!(query_error(err), StoreError::Unavailable(ref m) if m.contains("locked")),
        "sqlite busy must be unavailable"
    );
}

#[test]
fn other_database_errors_map_to_query_errors() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let path = dir.path().join("plain.db");
    let mut conn = connect(path.to_str().expect("utf-8")).expect("connection");
    let err = conn
        .batch_execute("SELECT * FROM no_such_table")
        .expect_err("no such table");
    assert!(matches!(query_error(err), StoreError::Query(ref m) if m.contains("no_such_table")));
    assert!(matches!(
        query_error(diesel::result::Error::NotFound),
        StoreError::Query(_)
    ));
    assert!(matches!(
        query_error(diesel::result::Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection,
            Box::new(String::from("connection closed")),
        )),
        StoreError::Unavailable(_)
    ));
}

#[test]
fn pool_failures_map_to_unavailable() {
    use deadpool::managed::{PoolError as E, TimeoutType};
    use diesel_async::pooled_connection::PoolError as Backend;

    for err in [
        E::Timeout(TimeoutType::Wait),
        E::Timeout(TimeoutType::Create),
        E::Closed,
        E::Backend(Backend::ConnectionError(ConnectionError::BadConnection(
            "unable to open database file".into(),
        ))),
    ] {
        assert!(matches!(pool_error(err), StoreError::Unavailable(_)));
    }
}

/// A caller that gives up mid-write neither loses nor half-applies the write, and the
/// store stays usable; on a current-thread runtime this would panic if diesel-async's
/// query future were dropped while its blocking job still ran.
#[tokio::test]
async fn a_cancelled_write_completes_and_leaves_the_store_usable() {
    let (store, _dir) = fresh(&StoreOptions::default()).await;
    let batch: Vec<StoredObject> = (0..5_000).map(|i| object(i, i, 1_000_000 + i)).collect();
    {
        let mut write = std::pin::pin!(store.upsert(&batch));
        // Poll once so the write is under way, then drop it.
        let polled = futures_poll_once(write.as_mut()).await;
        assert!(
            polled.is_none(),
            "a 5 000-row write cannot finish in one poll"
        );
    }
    // Writes take turns, so this one runs after the abandoned one has finished.
    store
        .upsert(&[object(9_999, 1, 2)])
        .await
        .expect("next write");
    assert_eq!(count(&store).await, 5_001);
}

/// Polls `fut` once; `Some` if it finished.
async fn futures_poll_once<F: Future + Unpin>(mut fut: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
            std::task::Poll::Ready(out) => Some(out),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

fn claim(raw: i64, generation: i64) -> Claim {
    Claim {
        trace: None,
        id: ObjectId::new(raw).expect("non-negative"),
        generation,
        attempts: 0,
        requested_at: Timestamp::from_unix_micros(0),
    }
}

fn ids(range: std::ops::Range<i64>) -> Vec<Requested> {
    range
        .map(|i| Requested::untraced(ObjectId::new(i).expect("non-negative")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_enqueue_larger_than_one_statement_is_one_transaction() {
    use std::sync::Mutex;

    use diesel::connection::{Instrumentation, InstrumentationEvent};

    let (store, _dir) = fresh(&StoreOptions::default()).await;
    let rows = i64::try_from(inbox::MAX_IDS_PER_STATEMENT + 1).expect("small");
    let raw: Vec<i64> = (0..rows).collect();
    let statements = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&statements);
    let mut conn = store.pool.get().await.expect("pooled connection");
    conn.spawn_blocking(move |conn| {
        conn.set_instrumentation(move |event: InstrumentationEvent<'_>| {
            if let InstrumentationEvent::StartQuery { query, .. } = event {
                let sql = query.to_string();
                let verb = sql.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
                seen.lock().expect("not poisoned").push(verb);
            }
        });
        let enqueue = Enqueue {
            ids: raw,
            traces: Vec::new(),
        };
        let result = inbox::enqueue(conn, &enqueue, 5);
        conn.set_instrumentation(None::<Box<dyn Instrumentation>>);
        result
    })
    .await
    .expect("enqueue");
    assert_eq!(
        *statements.lock().expect("not poisoned"),
        [
            "PRAGMA synchronous", // = FULL: the commit behind a 202 survives power loss
            "BEGIN IMMEDIATE",
            "INSERT INTO",
            "INSERT INTO",
            "COMMIT",
            "PRAGMA synchronous", // = NORMAL again
        ]
    );
    drop(conn);
    assert_eq!(
        store.inbox_backlog().await.expect("backlog"),
        Backlog {
            pending: u64::try_from(rows).expect("positive"),
            oldest: Some(Timestamp::from_unix_micros(5)),
            ..Backlog::default()
        }
    );
}

/// A completion that fails half-way leaves everything as it was: no object, no failure,
/// the ids still leased.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_completion_changes_nothing() {
    let (store, dir) = fresh(&StoreOptions::default()).await;
    let t = Timestamp::from_unix_micros;
    store.enqueue_ids(&ids(0..3), t(0)).await.expect("enqueue");
    assert_eq!(
        store
            .claim_ids("a", t(1), t(1_000), 10)
            .await
            .expect("claim")
            .len(),
        3
    );
    // Recording the failure, after the object's upsert, fails.
    let path = dir.path().join("unit.db");
    let mut conn = connect(path.to_str().expect("utf-8")).expect("direct connection");
    conn.batch_execute(
        "CREATE TRIGGER poison BEFORE INSERT ON fetch_failures \
         BEGIN SELECT RAISE(ABORT, 'poisoned failure'); END;",
    )
    .expect("create trigger");
    drop(conn);

    let err = store
        .complete_claims(
            "a",
            &[
                Completion {
                    claim: claim(0, 1),
                    outcome: Outcome::Online(object(0, 1, 2)),
                },
                Completion {
                    claim: claim(1, 1),
                    outcome: Outcome::Failed(FailureRecord {
                        id: ObjectId::new(1).expect("non-negative"),
                        code: "timeout".into(),
                        reason: "slow".into(),
                        at: t(2),
                        attempts: 1,
                    }),
                },
                Completion {
                    claim: claim(2, 1),
                    outcome: Outcome::Offline,
                },
            ],
            t(0),
        )
        .await
        .expect_err("the trigger fails the transaction");
    assert!(
        matches!(&err, StoreError::Query(m) if m.contains("poisoned failure")),
        "{err:?}"
    );
    assert_eq!(count(&store).await, 0);
    assert_eq!(
        store
            .dead_letters(&FailureQuery {
                limit: 10,
                ..FailureQuery::default()
            })
            .await
            .expect("failures"),
        []
    );
    assert_eq!(store.inbox_backlog().await.expect("backlog").pending, 3);
    assert_eq!(
        store
            .claim_ids("b", t(3), t(1_000), 10)
            .await
            .expect("claim"),
        [],
        "the leases still hold"
    );
}

/// Claims take the write lock like every other write: a claim waiting too long for it is
/// unavailable.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_waits_for_the_write_lock() {
    let options = StoreOptions {
        wait_timeout: Duration::from_millis(100),
        ..StoreOptions::default()
    };
    let (store, _dir) = fresh(&options).await;
    let t = Timestamp::from_unix_micros;
    store.enqueue_ids(&ids(0..3), t(0)).await.expect("enqueue");
    let turn = store.writes.lock().await;
    let err = store
        .claim_ids("a", t(1), t(1_000), 10)
        .await
        .expect_err("the write lock is held");
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("write lock")),
        "{err:?}"
    );
    drop(turn);
    assert_eq!(
        store
            .claim_ids("a", t(1), t(1_000), 10)
            .await
            .expect("claim")
            .len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_reports_a_file_another_process_holds_the_write_lock_of() {
    let (store, dir) = fresh(&StoreOptions {
        max_connections: 1,
        ..StoreOptions::default()
    })
    .await;
    store.ping_database().await.expect("a free file answers");
    let path = dir.path().join("unit.db");
    let mut holder = SqliteConnection::establish(path.to_str().expect("utf-8")).expect("connect");
    holder
        .batch_execute("BEGIN EXCLUSIVE")
        .expect("take the write lock");

    let started = std::time::Instant::now();
    let err = store
        .ping_database()
        .await
        .expect_err("the file cannot be written");
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("locked")),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    holder
        .batch_execute("ROLLBACK")
        .expect("give the lock back");
    store.ping_database().await.expect("answers again");
    // The probe's short wait did not stay on the session.
    let mut conn = store.pool.get().await.expect("the only connection");
    let busy: BusyTimeout = diesel::sql_query("PRAGMA busy_timeout")
        .get_result(&mut *conn)
        .await
        .expect("busy_timeout");
    assert_eq!(busy.timeout, 5_000);
}
