//! The `ObjectStore` and `Inbox` conformance suites against `SqliteStore`, on a fresh file
//! per case.

use std::sync::Arc;

use domain::ports::Database;
use storage::{SqliteStore, StoreOptions};
use tempfile::TempDir;

async fn fresh_store() -> (Arc<dyn Database>, TempDir) {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let store = SqliteStore::open(dir.path().join("store.db"), &StoreOptions::default())
        .await
        .expect("open a fresh sqlite store");
    (Arc::new(store), dir)
}

domain::object_store_conformance!(
    #[tokio::test(flavor = "multi_thread")]
    fresh_store()
);

domain::inbox_conformance!(
    #[tokio::test(flavor = "multi_thread")]
    fresh_store()
);
