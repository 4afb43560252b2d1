//! `storage::open` with SQLite urls: files, directories, migrations, the schema operators
//! read, the inbox across a restart, and refusals of urls it cannot serve.

use std::path::Path;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use domain::{ObjectId, Requested, StoredObject, Timestamp};
use storage::{OpenError, StoreOptions};

// `storage::open` returns an `Arc<dyn Database>`, which has no `Debug`: refusals are read
// with `.err().expect(…)` rather than `expect_err`.

fn url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

fn object(raw: i64) -> StoredObject {
    StoredObject {
        id: ObjectId::new(raw).expect("non-negative"),
        last_seen: Timestamp::from_unix_micros(1_700_000_000_000_001 + raw),
        expires_at: Timestamp::from_unix_micros(1_700_000_030_000_001 + raw),
    }
}

fn before_everything() -> Timestamp {
    Timestamp::from_unix_micros(0)
}

#[derive(QueryableByName, Debug, PartialEq)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName, Debug)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName, Debug)]
struct Plan {
    #[diesel(sql_type = Text)]
    detail: String,
}

fn names(conn: &mut SqliteConnection, query: &str) -> Vec<String> {
    diesel::sql_query(query)
        .load::<Name>(conn)
        .expect(query)
        .into_iter()
        .map(|n| n.name)
        .collect()
}

fn direct(path: &Path) -> SqliteConnection {
    SqliteConnection::establish(path.to_str().expect("utf-8")).expect("direct connection")
}

#[tokio::test(flavor = "multi_thread")]
async fn open_creates_the_missing_directories_and_the_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("not").join("there yet").join("service.db");
    assert!(!path.parent().expect("has a parent").exists());

    let store = storage::open(&url(&path), &StoreOptions::default())
        .await
        .expect("open");
    assert!(path.is_file(), "{} was not created", path.display());
    store.ping().await.expect("ping");
}

#[tokio::test(flavor = "multi_thread")]
async fn opening_twice_applies_the_migrations_once() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("twice.db");
    let first = storage::open(&url(&path), &StoreOptions::default())
        .await
        .expect("first open");
    first.upsert_seen(&[object(1)]).await.expect("write");
    // A second store on the same file while the first is still open, then a third after.
    let second = storage::open(&url(&path), &StoreOptions::default())
        .await
        .expect("second open");
    assert_eq!(
        second
            .get(object(1).id, before_everything())
            .await
            .expect("get"),
        Some(object(1))
    );
    drop((first, second));
    storage::open(&url(&path), &StoreOptions::default())
        .await
        .expect("third open");

    let mut conn = direct(&path);
    let applied: Count = diesel::sql_query("SELECT count(*) AS n FROM __diesel_schema_migrations")
        .get_result(&mut conn)
        .expect("migrations table");
    assert_eq!(
        applied.n, 4,
        "each of the four migrations was recorded once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn data_survives_closing_and_reopening() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("durable.db");
    let batch: Vec<StoredObject> = (0..100).map(object).collect();
    {
        let store = storage::open(&url(&path), &StoreOptions::default())
            .await
            .expect("open");
        store.upsert_seen(&batch).await.expect("write");
    }
    let store = storage::open(&url(&path), &StoreOptions::default())
        .await
        .expect("reopen");
    assert_eq!(
        store
            .list(before_everything(), None, 1_000)
            .await
            .expect("list"),
        batch
    );
    assert_eq!(
        store.next_expiry().await.expect("next_expiry"),
        Some(object(0).expires_at)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_schema_is_what_operators_read() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("schema.db");
    storage::open(&url(&path), &StoreOptions::default())
        .await
        .expect("open");
    let mut conn = direct(&path);

    assert_eq!(
        names(
            &mut conn,
            "SELECT name FROM pragma_table_info('objects') ORDER BY cid"
        ),
        ["id", "last_seen", "expires_at"]
    );
    assert_eq!(
        names(
            &mut conn,
            "SELECT name FROM pragma_index_list('objects') WHERE origin = 'c'"
        ),
        ["objects_expires_at_idx"]
    );
    assert_eq!(
        names(
            &mut conn,
            "SELECT name FROM pragma_index_info('objects_expires_at_idx')"
        ),
        ["expires_at"]
    );
    // The sweeper's question is answered from the index, not by scanning the table.
    let plan: Vec<Plan> =
        diesel::sql_query("EXPLAIN QUERY PLAN SELECT min(expires_at) FROM objects")
            .load(&mut conn)
            .expect("query plan");
    assert!(
        plan.iter()
            .any(|step| step.detail.contains("objects_expires_at_idx")),
        "{plan:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_inbox_schema_is_what_operators_read() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("schema.db");
    storage::open(&url(&path), &StoreOptions::default())
        .await
        .expect("open");
    let mut conn = direct(&path);

    assert_eq!(
        names(
            &mut conn,
            "SELECT name FROM pragma_table_info('inbox') ORDER BY cid"
        ),
        [
            "object_id",
            "generation",
            "requested_at",
            "lease_owner",
            "lease_until",
            "trace",
            "attempts",
            "last_error"
        ]
    );
    assert_eq!(
        names(
            &mut conn,
            "SELECT name FROM pragma_table_info('inbox') WHERE \"notnull\" = 0 ORDER BY cid"
        ),
        ["lease_owner", "lease_until", "trace", "last_error"]
    );
    assert_eq!(
        names(
            &mut conn,
            "SELECT name FROM pragma_table_info('fetch_failures') ORDER BY cid"
        ),
        [
            "seq",
            "object_id",
            "code",
            "reason",
            "failed_at",
            "attempts"
        ]
    );
    assert_eq!(
        names(
            &mut conn,
            "SELECT name FROM pragma_index_list('inbox') WHERE origin = 'c'"
        ),
        ["inbox_requested_at_idx"]
    );
    // Claims walk the index oldest first instead of sorting the whole inbox.
    let plan: Vec<Plan> = diesel::sql_query(
        "EXPLAIN QUERY PLAN SELECT object_id FROM inbox \
         WHERE lease_until IS NULL OR lease_until <= 0 ORDER BY requested_at LIMIT 10",
    )
    .load(&mut conn)
    .expect("query plan");
    assert!(
        plan.iter()
            .any(|step| step.detail.contains("inbox_requested_at_idx")),
        "{plan:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_inbox_survives_a_restart_and_its_leases_can_be_freed() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("restart.db");
    assert!(storage::is_single_instance(&url(&path)));
    let at = |micros: i64| Timestamp::from_unix_micros(1_700_000_000_000_001 + micros);
    let ids: Vec<ObjectId> = (0..10)
        .map(|i| ObjectId::new(i).expect("non-negative"))
        .collect();
    {
        let store = storage::open(&url(&path), &StoreOptions::default())
            .await
            .expect("open");
        let requests: Vec<Requested> = ids.iter().map(|&id| Requested::untraced(id)).collect();
        store.enqueue(&requests, at(0)).await.expect("enqueue");
        let claims = store
            .claim("first-run", at(1), at(60_000_000), 4)
            .await
            .expect("claim");
        assert_eq!(claims.len(), 4);
        // The process dies here, with four ids leased.
    }
    let store = storage::open(&url(&path), &StoreOptions::default())
        .await
        .expect("reopen");
    assert_eq!(
        store.backlog().await.expect("backlog"),
        domain::ports::Backlog {
            pending: 10,
            oldest: Some(at(0)),
            ..domain::ports::Backlog::default()
        }
    );
    assert_eq!(
        store
            .claim("second-run", at(2), at(60_000_000), 100)
            .await
            .expect("claim")
            .len(),
        6,
        "the dead run's leases still hold"
    );
    assert_eq!(store.release(None).await.expect("release"), 10);
    assert_eq!(
        store
            .claim("second-run", at(3), at(60_000_000), 100)
            .await
            .expect("claim")
            .len(),
        10
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_scheme_is_named_in_the_error() {
    let err = storage::open("mysql://root:hunter2@db/app", &StoreOptions::default())
        .await
        .expect_err("mysql is not supported");
    assert!(
        matches!(&err, OpenError::UnsupportedScheme { scheme } if scheme == "mysql"),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("\"mysql\""), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_is_not_a_database_fails_to_open() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("garbage.db");
    std::fs::write(&path, vec![0x5a_u8; 8_192]).expect("write garbage");
    let err = storage::open(&url(&path), &StoreOptions::default())
        .await
        .expect_err("not a database");
    assert!(
        matches!(err, OpenError::Connect { .. } | OpenError::Migrate(_)),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_connections_is_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let options = StoreOptions {
        max_connections: 0,
        ..StoreOptions::default()
    };
    let err = storage::open(&url(&dir.path().join("x.db")), &options)
        .await
        .expect_err("zero connections");
    assert!(matches!(err, OpenError::InvalidOptions(_)), "{err:?}");
}
