//! Ad-hoc upsert throughput of the stores (not a benchmark suite; `cargo xtask bench` owns
//! the figures). Run:
//!
//! ```text
//! cargo run --release -p storage --example upsert_throughput
//! cargo run --release -p storage --example upsert_throughput -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/postgres
//! ```
//!
//! Without arguments it measures `SqliteStore` on a temporary file. With
//! `--database-url postgres://…` it measures `PgStore` on a throwaway database it creates
//! on that server (the url's own database is only used to create and drop it).
//!
//! For each batch size it writes fresh ids (inserts), then the same ids again with later
//! times (refreshes), one batch after the other like the pipeline's single writer, and
//! prints ids per second. Every batch is one committed, durable transaction (SQLite:
//! `synchronous = FULL`; PostgreSQL: `synchronous_commit = on`).

use std::time::{Duration, Instant};

use domain::{ObjectId, ObjectStore, StoredObject, Timestamp};
use storage::testing::TestDatabase;
use storage::{PgStore, SqliteStore, StoreOptions};

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

async fn measure(backend: &str, store: &dyn ObjectStore, batch_size: i64) {
    let insert = run(store, batch_size, 1_700_000_000_000_000).await;
    let refresh = run(store, batch_size, 1_700_000_001_000_000).await;
    println!(
        "{backend:<10} batch {batch_size:>5}: insert {insert:>9.0} ids/s, refresh {refresh:>9.0} ids/s ({} batches of each)",
        IDS_PER_RUN / batch_size
    );
}

/// The value of `--database-url`, if given.
fn database_url() -> Option<String> {
    let mut args = std::env::args().skip(1);
    let mut url = None;
    while let Some(arg) = args.next() {
        match arg.split_once('=') {
            Some(("--database-url", value)) => url = Some(value.to_owned()),
            _ if arg == "--database-url" => {
                url = Some(args.next().expect("--database-url needs a value"));
            }
            _ => panic!("unknown argument {arg:?}; the only one is --database-url <postgres url>"),
        }
    }
    url
}

#[tokio::main]
async fn main() {
    let server_url = database_url();
    for batch_size in [200, 5_000] {
        match &server_url {
            None => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let store =
                    SqliteStore::open(dir.path().join("bench.db"), &StoreOptions::default())
                        .await
                        .expect("open");
                measure("sqlite", &store, batch_size).await;
            }
            Some(server_url) => {
                let db = TestDatabase::create_on(server_url)
                    .await
                    .unwrap_or_else(|err| panic!("{err}"));
                let store = PgStore::open(&db.url, &StoreOptions::default())
                    .await
                    .expect("open");
                measure("postgresql", &store, batch_size).await;
                drop(store);
            }
        }
    }
}
