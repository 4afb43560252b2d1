//! Ad-hoc throughput of the inbox's durable enqueue (not a benchmark suite; `cargo xtask
//! bench` owns the figures). Run:
//!
//! ```text
//! cargo run --release -p storage --example enqueue_throughput
//! cargo run --release -p storage --example enqueue_throughput -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/postgres
//! ```
//!
//! Without arguments it measures `SqliteStore` on a temporary file. With
//! `--database-url postgres://…` it measures `PgStore` on a throwaway database it creates
//! on that server (the url's own database is only used to create and drop it).
//!
//! Every `enqueue` is one committed, durable transaction (SQLite: `synchronous = FULL`;
//! PostgreSQL: `synchronous_commit = on`), measured as the service makes them:
//!
//! - one callback of 200 fresh ids per commit, one commit after the other;
//! - a group commit of 32 callbacks of 200 fresh ids (6 400 ids) per commit;
//! - 32 writers at once, each committing its own callbacks of 200 fresh ids (what the
//!   service would do without group commit);
//! - a group commit of 32 callbacks of the demo client's ids (0..99: every id is waiting
//!   already, so each commit bumps the same 100 rows).
//!
//! Each scenario starts on an empty database and prints ids/s and commits/s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::Timestamp;
use domain::ports::Database;
use domain::{ObjectId, Requested};
use storage::testing::TestDatabase;
use storage::{PgStore, SqliteStore, StoreOptions};

/// How long each scenario keeps committing, roughly.
const RUN_FOR: Duration = Duration::from_secs(3);

/// One way of feeding the inbox.
#[derive(Debug, Clone, Copy)]
enum Scenario {
    /// `writers` tasks at once, each committing `ids` fresh ids per enqueue.
    Fresh { writers: usize, ids: i64 },
    /// One writer committing ids 0..`ids` again and again.
    Hot { ids: i64 },
}

impl Scenario {
    fn describe(self) -> String {
        match self {
            Scenario::Fresh { writers: 1, ids } => format!("1 writer, {ids} fresh ids/commit"),
            Scenario::Fresh { writers, ids } => {
                format!("{writers} writers, {ids} fresh ids/commit each")
            }
            Scenario::Hot { ids } => format!("1 writer, the same {ids} ids/commit"),
        }
    }
}

fn ids(start: i64, len: i64) -> Vec<Requested> {
    (start..start + len)
        .map(|raw| Requested::untraced(ObjectId::new(raw).expect("non-negative")))
        .collect()
}

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

/// Commits until [`RUN_FOR`] has passed; returns (ids, commits) written by this writer.
async fn write(db: Arc<dyn Database>, writer: i64, scenario: Scenario) -> (u64, u64) {
    let started = Instant::now();
    let (mut ids_written, mut commits) = (0_u64, 0_u64);
    while started.elapsed() < RUN_FOR {
        let batch = match scenario {
            // Each writer draws from its own range, so every id is new.
            Scenario::Fresh { ids: len, .. } => ids(
                writer * 1_000_000_000 + i64::try_from(commits).expect("small") * len,
                len,
            ),
            Scenario::Hot { ids: len } => ids(0, len),
        };
        db.enqueue(&batch, now()).await.expect("enqueue");
        ids_written += batch.len() as u64;
        commits += 1;
    }
    (ids_written, commits)
}

async fn measure(backend: &str, db: Arc<dyn Database>, scenario: Scenario) {
    let writers = match scenario {
        Scenario::Fresh { writers, .. } => writers,
        Scenario::Hot { .. } => 1,
    };
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let db = Arc::clone(&db);
            tokio::spawn(write(db, i64::try_from(w).expect("small"), scenario))
        })
        .collect();
    let (mut total_ids, mut total_commits) = (0, 0);
    for task in tasks {
        let (ids, commits) = task.await.expect("writer task");
        total_ids += ids;
        total_commits += commits;
    }
    let secs = started.elapsed().as_secs_f64();
    let backlog = db.backlog().await.expect("backlog");
    println!(
        "{backend:<10} {:<40} {:>9.0} ids/s {:>7.0} commits/s ({total_commits} commits, {} ids waiting)",
        scenario.describe(),
        total_ids as f64 / secs,
        total_commits as f64 / secs,
        backlog.pending,
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
    let scenarios = [
        Scenario::Fresh {
            writers: 1,
            ids: 200,
        },
        Scenario::Fresh {
            writers: 1,
            ids: 32 * 200,
        },
        Scenario::Fresh {
            writers: 32,
            ids: 200,
        },
        Scenario::Hot { ids: 100 },
    ];
    for scenario in scenarios {
        match &server_url {
            None => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let store =
                    SqliteStore::open(dir.path().join("bench.db"), &StoreOptions::default())
                        .await
                        .expect("open");
                measure("sqlite", Arc::new(store), scenario).await;
            }
            Some(server_url) => {
                let db = TestDatabase::create_on(server_url)
                    .await
                    .unwrap_or_else(|err| panic!("{err}"));
                // As many connections as writers, so the concurrent scenario is not capped
                // by the pool.
                let options = StoreOptions {
                    max_connections: 32,
                    ..StoreOptions::default()
                };
                let store = PgStore::open(&db.url, &options).await.expect("open");
                measure("postgresql", Arc::new(store), scenario).await;
            }
        }
    }
}
