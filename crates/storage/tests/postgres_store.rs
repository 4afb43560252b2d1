//! `PgStore` through `storage::open` against a real PostgreSQL: the schema operators read,
//! migrations when instances start together, concurrent writers and sweepers, and what
//! callers see when the database goes away and comes back.
//!
//! Each test makes a database of its own and skips (loudly) where no server answers; see
//! `storage::testing`. The two tests that need no server always run.

use std::sync::Arc;
use std::time::Duration;

use domain::ports::Database;
use domain::{ObjectId, Requested, StoreError, StoredObject, Timestamp};
use storage::testing::TestDatabase;
use storage::{OpenError, PgStore, StoreOptions};
use tokio::time::{Instant, timeout};

/// The instant of `domain`'s conformance cases: 2023-11-14 22:13:20.123457 UTC.
const T0: i64 = 1_700_000_000_123_457;

fn object(raw: i64, last_seen: i64, expires_at: i64) -> StoredObject {
    StoredObject {
        id: ObjectId::new(raw).expect("non-negative"),
        last_seen: Timestamp::from_unix_micros(last_seen),
        expires_at: Timestamp::from_unix_micros(expires_at),
    }
}

/// A plain connection to `url` for looking behind the store's back.
async fn direct(url: &str) -> tokio_postgres::Client {
    storage::testing::connect(url)
        .await
        .expect("direct connection")
}

async fn open(url: &str) -> Arc<dyn Database> {
    storage::open(url, &StoreOptions::default())
        .await
        .expect("open the postgresql store")
}

/// Asks `check` until it answers `true`, failing after ten seconds.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_schema_is_what_operators_read() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    open(&db.url).await;
    let client = direct(&db.url).await;

    let columns: Vec<(String, String, String)> = client
        .query(
            "SELECT column_name::text, data_type::text, is_nullable::text \
             FROM information_schema.columns WHERE table_name = 'objects' \
             ORDER BY ordinal_position",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let expected = [
        ("id", "bigint", "NO"),
        ("last_seen", "timestamp with time zone", "NO"),
        ("expires_at", "timestamp with time zone", "NO"),
    ]
    .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()));
    assert_eq!(columns, expected);

    let indexes: Vec<(String, String)> = client
        .query(
            "SELECT indexname::text, indexdef FROM pg_indexes \
             WHERE tablename = 'objects' ORDER BY indexname",
            &[],
        )
        .await
        .expect("indexes")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(indexes.len(), 2, "{indexes:?}");
    assert_eq!(indexes[0].0, "objects_expires_at_idx");
    assert!(
        indexes[0].1.ends_with("USING btree (expires_at)"),
        "{indexes:?}"
    );
    assert_eq!(indexes[1].0, "objects_pkey");
    assert!(indexes[1].1.contains("UNIQUE INDEX"), "{indexes:?}");
}

/// The columns of `table` as `(name, type, nullable)`.
async fn columns(client: &tokio_postgres::Client, table: &str) -> Vec<(String, String, String)> {
    client
        .query(
            "SELECT column_name::text, data_type::text, is_nullable::text \
             FROM information_schema.columns WHERE table_name = $1 \
             ORDER BY ordinal_position",
            &[&table],
        )
        .await
        .expect("columns")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

fn owned(columns: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    columns
        .iter()
        .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_inbox_schema_is_what_operators_read() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    open(&db.url).await;
    let client = direct(&db.url).await;

    assert_eq!(
        columns(&client, "inbox").await,
        owned(&[
            ("object_id", "bigint", "NO"),
            ("generation", "bigint", "NO"),
            ("requested_at", "timestamp with time zone", "NO"),
            ("lease_owner", "text", "YES"),
            ("lease_until", "timestamp with time zone", "YES"),
            ("trace", "text", "YES"),
            ("attempts", "integer", "NO"),
            ("last_error", "text", "YES"),
        ])
    );
    assert_eq!(
        columns(&client, "fetch_failures").await,
        owned(&[
            ("seq", "bigint", "NO"),
            ("object_id", "bigint", "NO"),
            ("code", "text", "NO"),
            ("reason", "text", "NO"),
            ("failed_at", "timestamp with time zone", "NO"),
            ("attempts", "integer", "NO"),
        ])
    );
    let indexes: Vec<(String, String)> = client
        .query(
            "SELECT indexname::text, indexdef FROM pg_indexes \
             WHERE tablename IN ('inbox', 'fetch_failures') ORDER BY indexname",
            &[],
        )
        .await
        .expect("indexes")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let names: Vec<&str> = indexes.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "fetch_failures_failed_at_idx",
            "fetch_failures_object_id_idx",
            "fetch_failures_pkey",
            "inbox_pkey",
            "inbox_requested_at_idx"
        ]
    );
    assert!(
        indexes[4].1.ends_with("USING btree (requested_at)"),
        "{indexes:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_skips_ids_another_session_has_locked() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = open(&db.url).await;
    let at = |micros: i64| Timestamp::from_unix_micros(T0 + micros);
    let ids: Vec<ObjectId> = (1..=3)
        .map(|i| ObjectId::new(i).expect("non-negative"))
        .collect();
    let requests: Vec<Requested> = ids.iter().map(|&id| Requested::untraced(id)).collect();
    store.enqueue(&requests, at(0)).await.expect("enqueue");

    // Another instance is claiming id 2 right now and has not committed yet.
    let mut client = direct(&db.url).await;
    let other = client.transaction().await.expect("begin");
    other
        .batch_execute("SELECT * FROM inbox WHERE object_id = 2 FOR UPDATE")
        .await
        .expect("lock row 2");

    let claims = timeout(
        Duration::from_secs(10),
        store.claim("a", at(1), at(1_000_000), 10),
    )
    .await
    .expect("the claim does not wait for locked rows")
    .expect("claim");
    let mut claimed: Vec<i64> = claims.iter().map(|c| c.id.get()).collect();
    claimed.sort_unstable();
    assert_eq!(claimed, [1, 3]);

    other.rollback().await.expect("release the lock");
    let claims = store
        .claim("b", at(2), at(1_000_000), 10)
        .await
        .expect("claim");
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].id.get(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn stored_times_are_the_instants_operators_read() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = open(&db.url).await;
    store
        .upsert_seen(&[object(7, T0, T0 + 30_000_000)])
        .await
        .expect("upsert");

    let client = direct(&db.url).await;
    let row = client
        .query_one(
            "SELECT to_char(last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), \
                    to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), \
                    (extract(epoch FROM last_seen) * 1000000)::bigint \
             FROM objects WHERE id = 7",
            &[],
        )
        .await
        .expect("read the row");
    assert_eq!(row.get::<_, String>(0), "2023-11-14 22:13:20.123457");
    assert_eq!(row.get::<_, String>(1), "2023-11-14 22:13:50.123457");
    assert_eq!(row.get::<_, i64>(2), T0);
}

#[tokio::test(flavor = "multi_thread")]
async fn both_schemes_open_the_store() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (scheme, rest) = db.url.split_once("://").expect("a url");
    assert!(scheme == "postgres" || scheme == "postgresql", "{scheme}");
    for scheme in ["postgres", "postgresql", "POSTGRES"] {
        let store = open(&format!("{scheme}://{rest}")).await;
        store.ping().await.expect("ping");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_opening_a_fresh_database_together_all_succeed() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { storage::open(&url, &StoreOptions::default()).await })
        })
        .collect();
    for open in opens {
        let store = open
            .await
            .expect("open task")
            .expect("every concurrent open succeeds");
        store.ping().await.expect("ping");
    }
    let client = direct(&db.url).await;
    let applied: i64 = client
        .query_one("SELECT count(*) FROM __diesel_schema_migrations", &[])
        .await
        .expect("migrations table")
        .get(0);
    assert_eq!(applied, 4, "each of the four migrations was recorded once");
}

#[tokio::test(flavor = "multi_thread")]
async fn overlapping_concurrent_batches_leave_one_row_per_id() {
    const WRITERS: i64 = 8;
    const IDS: i64 = 3_000;
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = open(&db.url).await;
    // Every writer covers all ids in batches of 500, each in an order of its own (some
    // descending), so unsorted writes would lock rows in opposite orders and deadlock.
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut ids: Vec<i64> = (0..IDS).collect();
                ids.rotate_left(usize::try_from(w * 377).expect("small"));
                if w % 2 == 1 {
                    ids.reverse();
                }
                for chunk in ids.chunks(500) {
                    let batch: Vec<StoredObject> = chunk
                        .iter()
                        .map(|&i| object(i, T0 + w, T0 + 30_000_000 + w))
                        .collect();
                    store.upsert_seen(&batch).await.expect("concurrent upsert");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer task");
    }

    let client = direct(&db.url).await;
    let duplicates = client
        .query(
            "SELECT id, count(*) FROM objects GROUP BY id HAVING count(*) > 1",
            &[],
        )
        .await
        .expect("duplicates query");
    assert!(
        duplicates.is_empty(),
        "{} ids have duplicates",
        duplicates.len()
    );
    let stats = client
        .query_one(
            "SELECT count(*), count(DISTINCT id), \
                    count(*) FILTER (WHERE last_seen <> to_timestamp($1::float8 / 1000000)) \
             FROM objects",
            &[&((T0 + WRITERS - 1) as f64)],
        )
        .await
        .expect("stats query");
    assert_eq!(stats.get::<_, i64>(0), IDS);
    assert_eq!(stats.get::<_, i64>(1), IDS);
    assert_eq!(
        stats.get::<_, i64>(2),
        0,
        "every row keeps the latest last_seen"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sweepers_delete_each_row_once() {
    const ROWS: i64 = 2_000;
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = open(&db.url).await;
    let batch: Vec<StoredObject> = (0..ROWS).map(|i| object(i, T0, T0 + i)).collect();
    store.upsert_seen(&batch).await.expect("upsert");

    let cutoff = Timestamp::from_unix_micros(T0 + ROWS);
    let sweepers: Vec<_> = (0..2)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut total = 0;
                loop {
                    let deleted = store
                        .delete_expired(cutoff, 150)
                        .await
                        .expect("concurrent delete");
                    assert!(deleted <= 150, "a sweep deleted {deleted} rows");
                    if deleted == 0 {
                        return total;
                    }
                    total += deleted;
                }
            })
        })
        .collect();
    let mut totals = Vec::new();
    for sweeper in sweepers {
        totals.push(sweeper.await.expect("sweeper task"));
    }
    assert_eq!(
        totals.iter().sum::<u64>(),
        u64::try_from(ROWS).expect("positive"),
        "{totals:?}"
    );
    assert_eq!(store.next_expiry().await.expect("next_expiry"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_being_refreshed_is_not_deleted() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = open(&db.url).await;
    let batch: Vec<StoredObject> = (1..=3).map(|i| object(i, T0, T0 + i)).collect();
    store.upsert_seen(&batch).await.expect("upsert");

    // Another session refreshes row 2 and has not committed yet.
    let mut client = direct(&db.url).await;
    let refresh = client.transaction().await.expect("begin");
    refresh
        .execute(
            "UPDATE objects SET last_seen = last_seen + interval '1 hour', \
                                expires_at = expires_at + interval '1 hour' WHERE id = 2",
            &[],
        )
        .await
        .expect("refresh row 2");

    // The sweeper neither waits for that session nor deletes the row it holds.
    let cutoff = Timestamp::from_unix_micros(T0 + 10);
    let deleted = timeout(Duration::from_secs(10), store.delete_expired(cutoff, 100))
        .await
        .expect("the sweeper does not wait for locked rows")
        .expect("delete_expired");
    assert_eq!(deleted, 2);
    refresh.commit().await.expect("commit the refresh");

    let left = store
        .list(Timestamp::from_unix_micros(0), None, 10)
        .await
        .expect("list");
    assert_eq!(
        left,
        [object(2, T0 + 3_600_000_000, T0 + 2 + 3_600_000_000)]
    );
    assert_eq!(store.delete_expired(cutoff, 100).await.expect("sweep"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_blocked_past_the_statement_timeout_is_unavailable() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let options = StoreOptions {
        statement_timeout: Duration::from_millis(300),
        ..StoreOptions::default()
    };
    let store = storage::open(&db.url, &options).await.expect("open");
    let mut client = direct(&db.url).await;
    let lock = client.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE objects IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the table");

    let err = store
        .upsert_seen(&[object(1, T0, T0 + 1)])
        .await
        .expect_err("blocked past the statement timeout");
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("statement timeout")),
        "{err:?}"
    );

    lock.rollback().await.expect("release the lock");
    store
        .upsert_seen(&[object(1, T0, T0 + 1)])
        .await
        .expect("writes again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_session_is_unavailable_and_the_pool_replaces_it() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = open(&db.url).await;
    let mut client = direct(&db.url).await;
    let lock = client.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE objects IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the table");

    // A write waits for the lock; an operator terminates its session meanwhile.
    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.upsert_seen(&[object(1, T0, T0 + 1)]).await })
    };
    let admin = direct(db.server_url()).await;
    let waiting = "SELECT pid FROM pg_stat_activity WHERE datname = $1 \
                   AND application_name = 'callback-service' AND wait_event_type = 'Lock'";
    wait_until("the write waits for the lock", || async {
        !admin
            .query(waiting, &[&db.name])
            .await
            .expect("pg_stat_activity")
            .is_empty()
    })
    .await;
    admin
        .execute(
            &format!("SELECT pg_terminate_backend(pid) FROM ({waiting}) AS blocked"),
            &[&db.name],
        )
        .await
        .expect("terminate the writer's session");

    let err = writer
        .await
        .expect("writer task")
        .expect_err("its session was terminated");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");

    lock.rollback().await.expect("release the lock");
    // Every idle connection of the store goes too, as in a server restart.
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'callback-service'",
            &[&db.name],
        )
        .await
        .expect("terminate the idle sessions");
    // A connection used within the last second is not asked `SELECT 1` at checkout, so
    // one statement per killed connection may fail, as one in flight would; the pool
    // drops each such connection and opens new ones by itself.
    wait_until("the pool reconnects by itself", || async {
        store.ping().await.is_ok()
    })
    .await;
    store
        .upsert_seen(&[object(1, T0, T0 + 1)])
        .await
        .expect("writes again");
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_is_unavailable_while_the_database_is_gone_and_recovers() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = open(&db.url).await;
    store.ping().await.expect("ping");

    let admin = direct(db.server_url()).await;
    admin
        .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", db.name))
        .await
        .expect("drop the store's database");
    let err = store.ping().await.expect_err("the database is gone");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = store
        .upsert_seen(&[object(1, T0, T0 + 1)])
        .await
        .expect_err("the database is gone");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");

    admin
        .batch_execute(&format!("CREATE DATABASE {}", db.name))
        .await
        .expect("bring the database back");
    store.ping().await.expect("the store recovers by itself");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_port_fails_to_open_without_the_password() {
    let started = Instant::now();
    let err = PgStore::open(
        "postgres://postgres:hunter2@127.0.0.1:1/app",
        &StoreOptions::default(),
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(
        matches!(&err, OpenError::PostgresConnect { server, .. } if server == "127.0.0.1:1/app"),
        "{err:?}"
    );
    let chain = error_chain(&err);
    assert!(chain.contains("127.0.0.1:1/app"), "{chain}");
    assert!(!chain.contains("hunter2"), "{chain}");
    assert!(!format!("{err:?}").contains("hunter2"));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_answers_times_out_at_the_connect_timeout() {
    // Accepts TCP connections (the kernel does) but never speaks.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("address").port();
    let options = StoreOptions {
        connect_timeout: Duration::from_millis(300),
        ..StoreOptions::default()
    };
    let started = Instant::now();
    let err = PgStore::open(
        &format!("postgres://u:hunter2@127.0.0.1:{port}/app"),
        &options,
    )
    .await
    .expect_err("the server never answers");
    let elapsed = started.elapsed();
    assert!(matches!(err, OpenError::PostgresConnect { .. }), "{err:?}");
    let chain = error_chain(&err);
    assert!(chain.contains("no connection within"), "{chain}");
    assert!(!chain.contains("hunter2"), "{chain}");
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    drop(silent);
}

/// A TCP forwarder on 127.0.0.1 to the test server that, while down, closes every
/// connection at once: a PostgreSQL server that is not there yet.
struct Forwarder {
    addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let is_up = Arc::clone(&up);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !is_up.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { addr, up, task }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_away_at_start_is_waited_for_and_the_store_recovers_by_itself() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let server: tokio_postgres::Config = db.url.parse().expect("test url");
    let port = server.get_ports().first().copied().unwrap_or(5432);
    let host = match server.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let forwarder = Forwarder::start(format!("{host}:{port}")).await;
    let user = server.get_user().unwrap_or("postgres");
    let url = format!("postgres://{user}:hunter2@{}/{}", forwarder.addr, db.name);

    let started = Instant::now();
    let store = storage::open(&url, &StoreOptions::default())
        .await
        .expect("a server that is away is waited for, not an error");
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = store.ping().await.expect_err("not reachable yet");
    let StoreError::Unavailable(message) = &err else {
        panic!("{err:?}");
    };
    assert!(message.contains("not ready"), "{message}");
    assert!(message.contains(&forwarder.addr.to_string()), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    assert!(matches!(
        store.upsert_seen(&[object(1, T0, T0 + 1)]).await,
        Err(StoreError::Unavailable(_))
    ));

    forwarder
        .up
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "the store did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store
        .upsert_seen(&[object(1, T0, T0 + 1)])
        .await
        .expect("migrated and writable once the server is there");
}

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
