//! `storage::testing::TestDatabase`: a database per value, dropped with it, and the sweep
//! of what crashed runs left behind.
//!
//! One test only: the sweep runs once per process, at the first `create`, and this test
//! has to set the leftovers up before that.

use std::path::Path;

use storage::testing::{DEFAULT_SERVER_URL, TestDatabase};

async fn databases(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT datname::text FROM pg_database WHERE datname LIKE 'cbtest\\_%' ORDER BY 1",
            &[],
        )
        .await
        .expect("list databases")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// A pid no process has right now.
fn dead_pid() -> u32 {
    (3_000_000..4_000_000)
        .rev()
        .find(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        .expect("some pid is free")
}

#[tokio::test(flavor = "multi_thread")]
async fn leftovers_of_dead_processes_are_swept_and_databases_dropped() {
    let server_url =
        std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_SERVER_URL.to_owned());
    let Ok(admin) = storage::testing::connect(&server_url).await else {
        // No server: `create` skips loudly (or fails under REQUIRE_POSTGRES=1).
        assert!(TestDatabase::create().await.is_none());
        return;
    };

    // A crashed run's database, one of a live process (pid 1 never dies), and one of an
    // earlier process that had this process's pid.
    let dead = format!("cbtest_{}_0", dead_pid());
    let live = "cbtest_1_999999".to_owned();
    let same_pid = format!("cbtest_{}_999999", std::process::id());
    for name in [&dead, &live, &same_pid] {
        // Two statements: a multi-statement string would be one transaction, and neither
        // may run in one.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .await
            .expect("drop an older leftover");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a leftover");
    }

    let db = TestDatabase::create().await.expect("a server answers");
    let now = databases(&admin).await;
    assert!(!now.contains(&dead), "{now:?}");
    assert!(!now.contains(&same_pid), "{now:?}");
    assert!(now.contains(&live), "a live process's database was dropped");
    assert!(now.contains(&db.name), "{now:?}");
    assert!(db.url.ends_with(&format!("/{}", db.name)), "{}", db.url);
    assert!(
        db.name
            .starts_with(&format!("cbtest_{}_", std::process::id())),
        "{}",
        db.name
    );

    // The database is usable, and dropping the value drops it, sessions and all.
    let client = storage::testing::connect(&db.url)
        .await
        .expect("connect to the test database");
    client
        .batch_execute("CREATE TABLE t (x int)")
        .await
        .expect("use it");
    let second = TestDatabase::create().await.expect("a second database");
    assert_ne!(second.name, db.name);
    let name = db.name.clone();
    drop(db);
    let now = databases(&admin).await;
    assert!(!now.contains(&name), "{now:?}");
    assert!(now.contains(&second.name), "{now:?}");
    drop(second);

    admin
        .batch_execute(&format!("DROP DATABASE {live}"))
        .await
        .expect("clean up");
}
