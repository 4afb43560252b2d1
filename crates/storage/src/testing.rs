//! Throwaway PostgreSQL databases for tests, of this crate and of any other.
//!
//! [`TestDatabase::create`] reads the server from `TEST_DATABASE_URL` (default
//! [`DEFAULT_SERVER_URL`]), creates an empty database of its own named
//! `cbtest_<pid>_<n>` and drops it again when the value is dropped. The first use in a
//! process also drops what crashed runs left behind: `cbtest_<pid>_*` databases whose
//! process is gone. Databases of live processes are never touched, so several test
//! binaries can share one server.
//!
//! Where no server answers, `create` writes a loud `SKIPPED:` line straight to stderr
//! (past the test harness's capture) and returns `None`, so the test returns early; with
//! `REQUIRE_POSTGRES=1` (set by CI) it panics instead. A test reads:
//!
//! ```text
//! let Some(db) = TestDatabase::create().await else { return };
//! let store = storage::open(&db.url, &StoreOptions::default()).await?;
//! ```
//!
//! Liveness is read from `/proc/<pid>`, so the sweep assumes the test processes that share
//! a server run on one machine; without `/proc` nothing is swept.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The server tests use when `TEST_DATABASE_URL` is not set.
pub const DEFAULT_SERVER_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The prefix of every database this module creates.
const PREFIX: &str = "cbtest_";

/// How long connecting to the server may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Numbers the databases of this process.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Set once the leftovers of crashed runs were swept.
static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// Why `TEST_DATABASE_URL`'s server was found unreachable, once it was: later tests skip
/// at once instead of each waiting for the connect timeout again.
static UNREACHABLE: OnceLock<String> = OnceLock::new();

/// A PostgreSQL database of one's own, dropped (with any session still on it) when this
/// value is dropped.
pub struct TestDatabase {
    /// The url of the new database: the server's url with the database name replaced.
    pub url: String,
    /// The database's name, `cbtest_<pid>_<n>`.
    pub name: String,
    server_url: String,
}

impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDatabase")
            .field("url", &redact(&self.url))
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Why a test database could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TestDatabaseError {
    /// No PostgreSQL server answered.
    #[error("postgresql not reachable at {server}: {reason}")]
    Unreachable {
        /// The server's url, password redacted.
        server: String,
        /// What connecting said.
        reason: String,
    },
    /// The server answered but the database could not be made.
    #[error("cannot create a test database on {server}: {reason}")]
    Setup {
        /// The server's url, password redacted.
        server: String,
        /// What went wrong.
        reason: String,
    },
}

impl TestDatabase {
    /// A fresh database on `TEST_DATABASE_URL`'s server, or `None` (after a loud line on
    /// stderr) when no server answers and `REQUIRE_POSTGRES=1` is not set.
    ///
    /// # Panics
    ///
    /// When no server answers and `REQUIRE_POSTGRES=1` is set, and when the server answers
    /// but the database cannot be created.
    pub async fn create() -> Option<Self> {
        let server_url =
            std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_SERVER_URL.to_owned());
        let result = match UNREACHABLE.get() {
            Some(reason) => Err(TestDatabaseError::Unreachable {
                server: redact(&server_url),
                reason: reason.clone(),
            }),
            None => Self::create_on(&server_url).await,
        };
        match result {
            Ok(db) => Some(db),
            Err(TestDatabaseError::Unreachable { server, reason }) => {
                if postgres_required() {
                    panic!(
                        "PostgreSQL not reachable at {server} ({reason}); REQUIRE_POSTGRES=1 \
                         forbids skipping: start a server or point TEST_DATABASE_URL at one"
                    );
                }
                let _ = UNREACHABLE.set(reason.clone());
                let test = std::thread::current()
                    .name()
                    .map(|name| format!(" [{name}]"))
                    .unwrap_or_default();
                // Straight to the stderr stream: the harness captures `eprintln!` of
                // passing tests, and a skip must not pass silently.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: PostgreSQL not reachable at {server} — set TEST_DATABASE_URL or \
                     REQUIRE_POSTGRES=1{test} ({reason})"
                );
                None
            }
            Err(err) => panic!("{err}"),
        }
    }

    /// A fresh database on the server of `server_url` (a `postgres://` url of any database
    /// the user may connect to, with the right to create databases).
    pub async fn create_on(server_url: &str) -> Result<Self, TestDatabaseError> {
        let server = redact(server_url);
        let setup = |reason: String| TestDatabaseError::Setup {
            server: server.clone(),
            reason,
        };
        let client = admin_connect(server_url).await?;
        SWEPT.get_or_init(|| sweep_leftovers(&client)).await;

        let name = format!(
            "{PREFIX}{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let url = with_database(server_url, &name).map_err(|reason| setup(reason.into()))?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|err| setup(format!("CREATE DATABASE {name}: {}", describe(&err))))?;
        Ok(Self {
            url,
            name,
            server_url: server_url.to_owned(),
        })
    }

    /// The url of the server the database lives on (the one it was created from).
    pub fn server_url(&self) -> &str {
        &self.server_url
    }
}

impl Drop for TestDatabase {
    /// Drops the database, ending any session still connected to it.
    ///
    /// The work runs on a thread of its own with its own small runtime, so dropping works
    /// inside an async test as well as outside any runtime.
    fn drop(&mut self) {
        let server_url = self.server_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|err| format!("cannot start a runtime: {err}"))?;
            runtime.block_on(async {
                let client = admin_connect(&server_url)
                    .await
                    .map_err(|err| err.to_string())?;
                drop_database(&client, &name).await
            })
        })
        .join();
        let failure = match dropped {
            Ok(Ok(())) => return,
            Ok(Err(reason)) => reason,
            Err(_) => "the dropping thread panicked".to_owned(),
        };
        let _ = writeln!(
            std::io::stderr(),
            "WARNING: test database {} was not dropped: {failure}",
            self.name
        );
    }
}

/// Whether `REQUIRE_POSTGRES` asks for a failure instead of a skip.
fn postgres_required() -> bool {
    std::env::var("REQUIRE_POSTGRES")
        .is_ok_and(|value| matches!(value.trim(), "1" | "true" | "yes"))
}

/// Connects to the server for administration; the connection is driven on the current
/// runtime until the client is dropped.
async fn admin_connect(server_url: &str) -> Result<tokio_postgres::Client, TestDatabaseError> {
    connect(server_url).await
}

/// A direct connection (no pool, no session settings) to the database of `url`, with the
/// store's own TLS connector, so a `sslmode` in `TEST_DATABASE_URL` applies to the tests'
/// own connections too. The connection is driven on the current runtime until the client
/// is dropped.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, TestDatabaseError> {
    let server = redact(url);
    let (mut config, tls) = crate::postgres::parse_url(url, &crate::PgTlsOptions::default())
        .map_err(|err| TestDatabaseError::Setup {
            server: server.clone(),
            reason: err.to_string(),
        })?;
    config.connect_timeout(CONNECT_TIMEOUT);
    config.application_name("callback-service-tests");
    let connected = match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(tls)).await {
        Ok(connected) => connected,
        Err(_) => {
            return Err(TestDatabaseError::Unreachable {
                server,
                reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
            });
        }
    };
    match connected {
        Ok((client, connection)) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
        // The server answered (and refused): a setup problem, not a missing server.
        Err(err) if err.as_db_error().is_some() => Err(TestDatabaseError::Setup {
            server,
            reason: describe(&err),
        }),
        Err(err) => Err(TestDatabaseError::Unreachable {
            server,
            reason: describe(&err),
        }),
    }
}

/// Drops `cbtest_<pid>_*` databases whose process is gone, and those of this process's
/// pid, which can only be a dead process's that had the same pid: this runs before this
/// process creates any. Failures are reported, not fatal: a leftover costs disk space,
/// not correctness.
async fn sweep_leftovers(client: &tokio_postgres::Client) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let rows = match client
        .query(
            "SELECT datname FROM pg_database WHERE starts_with(datname, $1)",
            &[&PREFIX],
        )
        .await
    {
        Ok(rows) => rows,
        Err(err) => {
            let _ = writeln!(
                std::io::stderr(),
                "WARNING: cannot list leftover test databases: {}",
                describe(&err)
            );
            return;
        }
    };
    let own = std::process::id();
    for row in rows {
        let name: String = row.get(0);
        let Some(pid) = leftover_pid(&name) else {
            continue;
        };
        if pid != own && Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Err(reason) = drop_database(client, &name).await {
            let _ = writeln!(
                std::io::stderr(),
                "WARNING: cannot drop leftover test database {name}: {reason}"
            );
        }
    }
}

/// The pid in a name this module made (`cbtest_<pid>_<n>`), if it is one.
fn leftover_pid(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix(PREFIX)?.split_once('_')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// `DROP DATABASE IF EXISTS <name> WITH (FORCE)`; `name` is one this module made.
async fn drop_database(client: &tokio_postgres::Client, name: &str) -> Result<(), String> {
    debug_assert!(
        leftover_pid(name).is_some(),
        "{name} is not a test database"
    );
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .map_err(|err| describe(&err))
}

/// A tokio-postgres error with its cause (the server's message or the I/O error).
fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    match std::error::Error::source(err) {
        Some(cause) => format!("{err}: {cause}"),
        None => err.to_string(),
    }
}

/// `server_url` with its database replaced by `name` (and any `dbname` option removed).
fn with_database(server_url: &str, name: &str) -> Result<String, &'static str> {
    let (scheme, rest) = server_url
        .split_once("://")
        .filter(|(scheme, _)| {
            scheme.eq_ignore_ascii_case("postgres") || scheme.eq_ignore_ascii_case("postgresql")
        })
        .ok_or("the server url must be a postgres:// or postgresql:// url")?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.split_once('?').map(|(_, query)| query);
    let mut url = format!("{scheme}://{authority}/{name}");
    if let Some(query) = query {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some("dbname"))
            .collect();
        if !kept.is_empty() {
            url.push('?');
            url.push_str(&kept.join("&"));
        }
    }
    Ok(url)
}

/// `url` with the password (in the user info or a `password` option) replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a url>".to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key == "password" => format!("{key}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_replaced_and_options_are_kept() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "cbtest_1_0").unwrap(),
            "postgres://postgres@127.0.0.1:5432/cbtest_1_0"
        );
        assert_eq!(
            with_database("postgresql://u:p@db?sslmode=disable", "cbtest_1_0").unwrap(),
            "postgresql://u:p@db/cbtest_1_0?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://db/app?dbname=app&connect_timeout=3", "x_1_2").unwrap(),
            "postgres://db/x_1_2?connect_timeout=3"
        );
        assert!(with_database("host=db user=postgres", "x").is_err());
        assert!(with_database("mysql://db/app", "x").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:hunter2@db:5432/app"),
            "postgres://u:***@db:5432/app"
        );
        assert_eq!(
            redact("postgres://db/app?user=u&password=hunter2"),
            "postgres://db/app?user=u&password=***"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1:5432/postgres"),
            "postgres://postgres@127.0.0.1:5432/postgres"
        );
        assert!(!redact("host=db password=hunter2").contains("hunter2"));
    }

    #[test]
    fn only_names_of_this_module_are_leftovers() {
        assert_eq!(leftover_pid("cbtest_123_0"), Some(123));
        assert_eq!(leftover_pid("cbtest_123_45"), Some(123));
        assert_eq!(leftover_pid("cbtest_123_"), None);
        assert_eq!(leftover_pid("cbtest_abc_1"), None);
        assert_eq!(leftover_pid("cbtest_1_2; DROP"), None);
        assert_eq!(leftover_pid("postgres"), None);
    }
}
