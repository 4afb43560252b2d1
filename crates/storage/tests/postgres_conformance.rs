//! The `ObjectStore` and `Inbox` conformance suites against `PgStore`, on a fresh database
//! per case.
//!
//! Without a PostgreSQL server every case says so on stderr and passes without running;
//! with `REQUIRE_POSTGRES=1` every case fails instead (see `storage::testing`).

use std::sync::Arc;

use domain::ports::Database;
use storage::testing::TestDatabase;
use storage::{PgStore, StoreOptions};

/// A store on a database of its own, or `None` where no server answers. The store comes
/// first in the tuple, so its connections close before the database is dropped.
async fn fresh_store() -> Option<(Arc<dyn Database>, TestDatabase)> {
    let db = TestDatabase::create().await?;
    let store = PgStore::open(&db.url, &StoreOptions::default())
        .await
        .expect("open a fresh postgresql store");
    Some((Arc::new(store), db))
}

domain::object_store_conformance!(
    #[tokio::test(flavor = "multi_thread")]
    fresh_store()
);

domain::inbox_conformance!(
    #[tokio::test(flavor = "multi_thread")]
    fresh_store()
);
