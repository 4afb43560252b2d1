//! Unit tests of what the conformance suite cannot see: session settings, one statement per
//! batch, time conversion, timeouts and error mapping.
//!
//! Tests that need a server skip (loudly) without one; see `crate::testing`.

use std::sync::Mutex;
use std::time::Duration;

use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel::sql_types::Text;

use super::*;
use crate::testing::TestDatabase;
use domain::ports::Outcome;

async fn fresh(options: &StoreOptions) -> Option<(PgStore, TestDatabase)> {
    let db = TestDatabase::create().await?;
    let store = PgStore::open(&db.url, options)
        .await
        .expect("open a fresh postgresql store");
    Some((store, db))
}

fn object(raw: i64, last_seen: i64, expires_at: i64) -> StoredObject {
    StoredObject {
        id: ObjectId::new(raw).expect("non-negative"),
        last_seen: Timestamp::from_unix_micros(last_seen),
        expires_at: Timestamp::from_unix_micros(expires_at),
    }
}

#[derive(QueryableByName, Debug, PartialEq)]
struct Session {
    #[diesel(sql_type = Text)]
    statement_timeout: String,
    #[diesel(sql_type = Text)]
    application_name: String,
    #[diesel(sql_type = Text)]
    synchronous_commit: String,
    #[diesel(sql_type = Text)]
    time_zone: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn every_pooled_connection_gets_the_session_settings() {
    let options = StoreOptions {
        max_connections: 3,
        statement_timeout: Duration::from_millis(1_234),
        ..StoreOptions::default()
    };
    let Some((store, _db)) = fresh(&options).await else {
        return;
    };
    // Hold all three at once, so they are three distinct connections.
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(store.pool.get().await.expect("pooled connection"));
    }
    for conn in &mut conns {
        let session: Session = diesel::sql_query(
            "SELECT current_setting('statement_timeout') AS statement_timeout, \
                    current_setting('application_name') AS application_name, \
                    current_setting('synchronous_commit') AS synchronous_commit, \
                    current_setting('TimeZone') AS time_zone",
        )
        .get_result(&mut **conn)
        .await
        .expect("read the session settings");
        assert_eq!(
            session,
            Session {
                statement_timeout: "1234ms".into(),
                application_name: "callback-service".into(),
                synchronous_commit: "on".into(),
                time_zone: "UTC".into(),
            }
        );
    }
}

#[test]
fn the_statement_timeout_rounds_up_to_milliseconds() {
    assert!(
        session_settings(Duration::from_secs(30)).starts_with("SET statement_timeout = 30000;")
    );
    assert!(
        session_settings(Duration::from_micros(1_500)).starts_with("SET statement_timeout = 2;")
    );
    assert!(session_settings(Duration::from_nanos(1)).starts_with("SET statement_timeout = 1;"));
    assert!(session_settings(Duration::ZERO).starts_with("SET statement_timeout = 0;"));
}

/// Records the first two words of every statement a connection sends.
fn record_statements(conn: &mut AsyncPgConnection) -> Arc<Mutex<Vec<String>>> {
    let statements = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&statements);
    diesel_async::AsyncConnection::set_instrumentation(
        conn,
        move |event: InstrumentationEvent<'_>| {
            if let InstrumentationEvent::StartQuery { query, .. } = event {
                let sql = query.to_string();
                let verb = sql.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
                seen.lock().expect("not poisoned").push(verb);
            }
        },
    );
    statements
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_is_one_statement_whatever_its_size() {
    let options = StoreOptions {
        max_connections: 1,
        ..StoreOptions::default()
    };
    let Some((store, _db)) = fresh(&options).await else {
        return;
    };
    // The pool's only connection, instrumented and handed back.
    let mut conn = store.pool.get().await.expect("the only connection");
    let statements = record_statements(&mut conn);
    drop(conn);

    let batch: Vec<StoredObject> = (0..5_000).map(|i| object(i, i, 1_000_000 + i)).collect();
    store.upsert(&batch).await.expect("first batch");
    store.upsert(&batch).await.expect("same batch again");
    let written: Vec<String> = statements
        .lock()
        .expect("not poisoned")
        .iter()
        // The pool's `SELECT 1` check, should the connection have idled for a second.
        .filter(|verb| !verb.starts_with("SELECT"))
        .cloned()
        .collect();
    assert_eq!(written, ["INSERT INTO", "INSERT INTO"]);

    let mut conn = store.pool.get().await.expect("the only connection");
    diesel_async::AsyncConnection::set_instrumentation(
        &mut *conn,
        None::<Box<dyn Instrumentation>>,
    );
    drop(conn);
    assert_eq!(
        store
            .list_live(Timestamp::from_unix_micros(0), None, usize::MAX)
            .await
            .expect("list"),
        batch
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_too_long_for_a_connection_is_unavailable() {
    let options = StoreOptions {
        max_connections: 1,
        wait_timeout: Duration::from_millis(100),
        ..StoreOptions::default()
    };
    let Some((store, _db)) = fresh(&options).await else {
        return;
    };
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
async fn a_statement_past_the_statement_timeout_is_unavailable() {
    let options = StoreOptions {
        statement_timeout: Duration::from_millis(200),
        ..StoreOptions::default()
    };
    let Some((store, _db)) = fresh(&options).await else {
        return;
    };
    let err = store
        .run(|mut conn| async move {
            diesel::sql_query("SELECT pg_sleep(10)")
                .execute(&mut conn)
                .await
        })
        .await
        .expect_err("cancelled by the statement timeout");
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("statement timeout")),
        "{err:?}"
    );
    store.ping_database().await.expect("the store still works");
}

#[test]
fn times_convert_between_the_two_epochs() {
    let unix_2000 = Timestamp::from_unix_micros(PG_EPOCH_UNIX_MICROS);
    assert_eq!(to_pg(unix_2000).unwrap(), PgTimestamp(0));
    assert_eq!(
        to_pg(Timestamp::from_unix_micros(0)).unwrap(),
        PgTimestamp(-PG_EPOCH_UNIX_MICROS)
    );
    for micros in [0, 1, 1_700_000_000_123_457, -5, i64::MAX] {
        let t = Timestamp::from_unix_micros(micros);
        assert_eq!(from_pg(to_pg(t).unwrap()).unwrap(), t);
    }
    assert!(matches!(
        to_pg(Timestamp::from_unix_micros(i64::MIN)),
        Err(StoreError::Query(_))
    ));
    assert!(matches!(
        from_pg(PgTimestamp(i64::MAX)),
        Err(StoreError::Query(_))
    ));
}

fn database_error(kind: DatabaseErrorKind, message: &str) -> diesel::result::Error {
    diesel::result::Error::DatabaseError(kind, Box::new(message.to_owned()))
}

#[test]
fn lost_connections_timeouts_and_shutdowns_are_unavailable() {
    use DatabaseErrorKind::{
        ClosedConnection, ReadOnlyTransaction, SerializationFailure, UnableToSendCommand, Unknown,
    };

    for (kind, message) in [
        (Unknown, "canceling statement due to statement timeout"),
        (Unknown, "canceling statement due to user request"),
        (
            Unknown,
            "terminating connection due to administrator command",
        ),
        (Unknown, "the database system is shutting down"),
        (Unknown, "sorry, too many clients already"),
        (Unknown, "deadlock detected"),
        (
            SerializationFailure,
            "could not serialize access due to concurrent update",
        ),
        (
            ReadOnlyTransaction,
            "cannot execute INSERT in a read-only transaction",
        ),
        (ClosedConnection, "closed"),
        (UnableToSendCommand, "connection closed"),
        (UnableToSendCommand, "error communicating with the server"),
    ] {
        assert!(
            matches!(query_error(database_error(kind, message)), StoreError::Unavailable(ref m) if m == message),
            "{kind:?} {message:?} must be unavailable"
        );
    }
}

#[test]
fn other_errors_are_query_errors() {
    use DatabaseErrorKind::{UnableToSendCommand, UniqueViolation, Unknown};

    for (kind, message) in [
        (Unknown, "syntax error at or near \"SELEC\""),
        (Unknown, "relation \"objects\" does not exist"),
        (Unknown, "timestamp out of range"),
        (
            UniqueViolation,
            "duplicate key value violates unique constraint",
        ),
        (UnableToSendCommand, "error serializing parameter 0"),
    ] {
        assert!(
            matches!(
                query_error(database_error(kind, message)),
                StoreError::Query(_)
            ),
            "{kind:?} {message:?} must be a query error"
        );
    }
    assert!(matches!(
        query_error(diesel::result::Error::NotFound),
        StoreError::Query(_)
    ));
}

#[test]
fn pool_failures_are_unavailable() {
    use deadpool::managed::{PoolError as E, TimeoutType};
    use diesel_async::pooled_connection::PoolError as Backend;

    for err in [
        E::Timeout(TimeoutType::Wait),
        E::Timeout(TimeoutType::Create),
        E::Timeout(TimeoutType::Recycle),
        E::Closed,
        E::Backend(Backend::ConnectionError(ConnectionError::BadConnection(
            "error connecting to server: Connection refused (os error 111)".into(),
        ))),
    ] {
        assert!(matches!(pool_error(err), StoreError::Unavailable(_)));
    }
}

#[tokio::test]
async fn bad_urls_are_refused_without_repeating_them() {
    for url in [
        "postgres://user:hunter2@db:notaport/app",
        "postgres://user:hunter2@db/app?hunter2=x",
        "postgres://user:hunter2@db/app?connect_timeout=hunter2",
    ] {
        let err = PgStore::open(url, &StoreOptions::default())
            .await
            .expect_err("not a usable url");
        assert!(matches!(err, OpenError::InvalidPostgresUrl(_)), "{err:?}");
        let message = format!("{err} / {err:?}");
        assert!(!message.contains("hunter2"), "{message}");
    }
}

#[test]
fn the_server_is_described_without_credentials() {
    let config: tokio_postgres::Config = "postgres://alice:hunter2@db.internal:5433/app"
        .parse()
        .expect("a valid url");
    assert_eq!(describe_server(&config), "db.internal:5433/app");
    let config: tokio_postgres::Config = "postgresql://alice@db".parse().expect("a valid url");
    assert_eq!(describe_server(&config), "db:5432/alice");
    assert_eq!(lowercase_scheme("POSTGRES://db/app"), "postgres://db/app");
    assert_eq!(lowercase_scheme("postgres://DB/app"), "postgres://DB/app");
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

#[tokio::test(flavor = "multi_thread")]
async fn an_enqueue_is_one_statement_and_a_completion_one_transaction() {
    let options = StoreOptions {
        max_connections: 1,
        ..StoreOptions::default()
    };
    let Some((store, _db)) = fresh(&options).await else {
        return;
    };
    let mut conn = store.pool.get().await.expect("the only connection");
    let statements = record_statements(&mut conn);
    drop(conn);
    let t = |micros: i64| Timestamp::from_unix_micros(1_700_000_000_000_000 + micros);
    let ids: Vec<Requested> = (0..5_000)
        .map(|i| Requested::untraced(ObjectId::new(i).expect("non-negative")))
        .collect();

    store.enqueue_ids(&ids, t(0)).await.expect("enqueue");
    let claims = store
        .claim_ids("a", t(1), t(1_000_000), 10_000)
        .await
        .expect("claim");
    assert_eq!(claims.len(), 5_000);
    // Id 2 is requested again while leased, so its completion frees it instead.
    store.enqueue_ids(&ids[2..3], t(2)).await.expect("enqueue");
    let failure = FailureRecord {
        id: ids[1].id,
        code: "timeout".into(),
        reason: "slow".into(),
        at: t(3),
        attempts: 1,
    };
    store
        .complete_claims(
            "a",
            &[
                Completion {
                    claim: claim(0, 1),
                    outcome: Outcome::Online(object(0, 1, 2)),
                },
                Completion {
                    claim: claim(1, 1),
                    outcome: Outcome::Failed(failure),
                },
                Completion {
                    claim: claim(2, 1),
                    outcome: Outcome::Offline,
                },
            ],
            t(0),
        )
        .await
        .expect("complete");

    let mut conn = store.pool.get().await.expect("the only connection");
    diesel_async::AsyncConnection::set_instrumentation(
        &mut *conn,
        None::<Box<dyn Instrumentation>>,
    );
    drop(conn);
    let sent: Vec<String> = statements
        .lock()
        .expect("not poisoned")
        .iter()
        // The pool's `SELECT 1` check, should the connection have idled for a second.
        .filter(|verb| verb.as_str() != "SELECT $1")
        .cloned()
        .collect();
    assert_eq!(
        sent,
        [
            "INSERT INTO",
            "UPDATE \"inbox\"",
            "INSERT INTO",
            "BEGIN",
            "INSERT INTO",
            "INSERT INTO",
            "SELECT \"inbox\".\"object_id\",",
            "DELETE FROM",
            "UPDATE \"inbox\"",
            "COMMIT",
        ]
    );
    assert_eq!(
        store.inbox_backlog().await.expect("backlog"),
        Backlog {
            pending: 4_998,
            oldest: Some(t(0)),
            ..Backlog::default()
        }
    );
}

/// A completion that fails half-way leaves everything as it was: no object, no failure,
/// the ids still leased.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_completion_changes_nothing() {
    let Some((store, db)) = fresh(&StoreOptions::default()).await else {
        return;
    };
    let t = |micros: i64| Timestamp::from_unix_micros(1_700_000_000_000_000 + micros);
    let ids: Vec<Requested> = (0..3)
        .map(|i| Requested::untraced(ObjectId::new(i).expect("non-negative")))
        .collect();
    store.enqueue_ids(&ids, t(0)).await.expect("enqueue");
    assert_eq!(
        store
            .claim_ids("a", t(1), t(1_000_000), 10)
            .await
            .expect("claim")
            .len(),
        3
    );
    // Recording the failure, after the object's upsert, fails.
    let client = crate::testing::connect(&db.url)
        .await
        .expect("direct connection");
    client
        .batch_execute(
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'poisoned failure'; END $$; \
             CREATE TRIGGER poison BEFORE INSERT ON fetch_failures \
             FOR EACH ROW EXECUTE FUNCTION poison();",
        )
        .await
        .expect("create the trigger");

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
                        id: ids[1].id,
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
    assert_eq!(
        store
            .list_live(Timestamp::from_unix_micros(0), None, 10)
            .await
            .expect("list"),
        []
    );
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
            .claim_ids("b", t(3), t(1_000_000), 10)
            .await
            .expect("claim"),
        [],
        "the leases still hold"
    );
}
