//! Ad-hoc upsert throughput of `SqliteStore` on a temporary file (not a benchmark suite;
//! `cargo xtask bench` owns the figures). Run:
//!
//! ```text
//! cargo run --release -p storage --example upsert_throughput
//! ```
//!
//! For each batch size it writes fresh ids (inserts), then the same ids again with later
//! times (refreshes), one batch after the other like the pipeline's single writer, and
//! prints ids per second. Every batch is one committed, fsynced transaction.

use std::time::{Duration, Instant};

use domain::{ObjectId, ObjectStore, StoredObject, Timestamp};
use storage::{SqliteStore, StoreOptions};

const IDS_PER_RUN: i64 = 200_000;

fn batch(start: i64, len: i64, seen: i64) -> Vec<StoredObject> {
    (start..start + len)
        .map(|raw| StoredObject {
            id: ObjectId::new(raw).expect("non-negative"),
            last_seen: Timestamp::from_unix_micros(seen + raw),
            expires_at: Timestamp::from_unix_micros(seen + raw)
                .saturating_add(Duration::from_secs(30)),
        })
        .collect()
}

async fn run(store: &dyn ObjectStore, batch_size: i64, seen: i64) -> f64 {
    let batches: Vec<Vec<StoredObject>> = (0..IDS_PER_RUN / batch_size)
        .map(|b| batch(b * batch_size, batch_size, seen))
        .collect();
    let started = Instant::now();
    for b in &batches {
        store.upsert_seen(b).await.expect("upsert");
    }
    let elapsed = started.elapsed();
    (batches.len() as f64 * batch_size as f64) / elapsed.as_secs_f64()
}

#[tokio::main]
async fn main() {
    for batch_size in [200, 5_000] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = SqliteStore::open(dir.path().join("bench.db"), &StoreOptions::default())
            .await
            .expect("open");
        let insert = run(&store, batch_size, 1_700_000_000_000_000).await;
        let refresh = run(&store, batch_size, 1_700_000_001_000_000).await;
        println!(
            "batch {batch_size:>5}: insert {insert:>9.0} ids/s, refresh {refresh:>9.0} ids/s ({} batches of each)",
            IDS_PER_RUN / batch_size
        );
    }
}
