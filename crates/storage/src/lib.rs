//! diesel + diesel-async adapters of the [`domain::ObjectStore`] and
//! [`domain::ports::Inbox`] ports.
//!
//! [`open`] reads a database url and returns the matching store with its migrations
//! applied, as one [`Database`] (callers upcast it to `Arc<dyn ObjectStore>` or
//! `Arc<dyn Inbox>`): `sqlite://<path>` gives the embedded [`SqliteStore`], `postgres://…`
//! and `postgresql://…` the production [`PgStore`]. [`is_single_instance`] tells whether
//! the url's database serves one instance only. With the `testing` feature,
//! [`testing::TestDatabase`] gives tests a throwaway PostgreSQL database.

/// Implements [`domain::ObjectStore`] and [`domain::Inbox`] for an adapter by delegating
/// to its inherent async methods of the same names, so the glue is written once for both
/// backends and each adapter only states its queries.
macro_rules! delegate_ports {
    ($store:ty) => {
        impl ::domain::ObjectStore for $store {
            fn upsert_seen<'a>(
                &'a self,
                batch: &'a [::domain::StoredObject],
            ) -> ::domain::BoxFuture<'a, Result<(), ::domain::StoreError>> {
                Box::pin(self.upsert(batch))
            }

            fn delete_expired(
                &self,
                cutoff: ::domain::Timestamp,
                limit: usize,
            ) -> ::domain::BoxFuture<'_, Result<u64, ::domain::StoreError>> {
                Box::pin(self.delete_due(cutoff, limit))
            }

            fn next_expiry(&self) -> ::domain::BoxFuture<'_, Result<Option<::domain::Timestamp>, ::domain::StoreError>> {
                Box::pin(self.earliest_expiry())
            }

            fn get(
                &self,
                id: ::domain::ObjectId,
                now: ::domain::Timestamp,
            ) -> ::domain::BoxFuture<'_, Result<Option<::domain::StoredObject>, ::domain::StoreError>> {
                Box::pin(self.get_live(id, now))
            }

            fn list(
                &self,
                now: ::domain::Timestamp,
                after: Option<::domain::ObjectId>,
                limit: usize,
            ) -> ::domain::BoxFuture<'_, Result<Vec<::domain::StoredObject>, ::domain::StoreError>> {
                Box::pin(self.list_live(now, after, limit))
            }

            fn ping(&self) -> ::domain::BoxFuture<'_, Result<(), ::domain::StoreError>> {
                Box::pin(self.ping_database())
            }
        }

        impl ::domain::Inbox for $store {
            fn enqueue<'a>(
                &'a self,
                requests: &'a [::domain::Requested],
                at: ::domain::Timestamp,
            ) -> ::domain::BoxFuture<'a, Result<(), ::domain::StoreError>> {
                Box::pin(self.enqueue_ids(requests, at))
            }

            fn claim<'a>(
                &'a self,
                owner: &'a str,
                now: ::domain::Timestamp,
                lease_until: ::domain::Timestamp,
                limit: usize,
            ) -> ::domain::BoxFuture<'a, Result<Vec<::domain::Claim>, ::domain::StoreError>> {
                Box::pin(self.claim_ids(owner, now, lease_until, limit))
            }

            fn complete<'a>(
                &'a self,
                owner: &'a str,
                done: &'a [::domain::Completion],
                again_from: ::domain::Timestamp,
            ) -> ::domain::BoxFuture<'a, Result<(), ::domain::StoreError>> {
                Box::pin(self.complete_claims(owner, done, again_from))
            }

            fn release<'a>(&'a self, owner: Option<&'a str>) -> ::domain::BoxFuture<'a, Result<u64, ::domain::StoreError>> {
                Box::pin(self.release_leases(owner))
            }

            fn renew<'a>(
                &'a self,
                owner: &'a str,
                lease_until: ::domain::Timestamp,
            ) -> ::domain::BoxFuture<'a, Result<u64, ::domain::StoreError>> {
                Box::pin(self.renew_leases(owner, lease_until))
            }

            fn backlog(&self) -> ::domain::BoxFuture<'_, Result<::domain::Backlog, ::domain::StoreError>> {
                Box::pin(self.inbox_backlog())
            }

            fn failures<'a>(
                &'a self,
                query: &'a ::domain::FailureQuery,
            ) -> ::domain::BoxFuture<'a, Result<Vec<::domain::DeadLetter>, ::domain::StoreError>> {
                Box::pin(self.dead_letters(query))
            }

            fn replay_failures<'a>(
                &'a self,
                filter: &'a ::domain::FailureFilter,
                at: ::domain::Timestamp,
            ) -> ::domain::BoxFuture<'a, Result<u64, ::domain::StoreError>> {
                Box::pin(self.replay(filter, at))
            }

            fn purge_failures<'a>(
                &'a self,
                filter: &'a ::domain::FailureFilter,
            ) -> ::domain::BoxFuture<'a, Result<u64, ::domain::StoreError>> {
                Box::pin(self.purge(filter))
            }
        }
    };
}
pub(crate) use delegate_ports;

mod errors;
mod inbox;
pub mod metrics;
mod postgres;
mod sqlite;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use domain::ports::Database;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// How a store's connection pool behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// The most connections the pool keeps open at once (at least 1).
    pub max_connections: usize,
    /// How long a call waits for a free connection (SQLite: also for a new one to open,
    /// or for its turn to write) before it fails as unavailable.
    pub wait_timeout: Duration,
    /// PostgreSQL: how long opening one connection (TCP, handshake, session settings) may
    /// take before it fails as unavailable. SQLite opens a local file and ignores it.
    pub connect_timeout: Duration,
    /// PostgreSQL: the server cancels any statement that runs longer (`statement_timeout`),
    /// and the call fails as unavailable; zero means no limit. SQLite ignores it.
    pub statement_timeout: Duration,
    /// PostgreSQL: the TLS files given outside the url (the url's `sslrootcert`, `sslcert`
    /// and `sslkey` may name them instead, but not differently). SQLite ignores them.
    pub tls: PgTlsOptions,
}

/// TLS files for PostgreSQL given as settings rather than in the url; see
/// [`PgStore::open`] for the url's `sslmode`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTlsOptions {
    /// The CA certificates (PEM) the server's certificate must chain up to, as the url's
    /// `sslrootcert`.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for mutual TLS, as the url's `sslcert`.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM), as the url's `sslkey`.
    pub key_file: Option<PathBuf>,
}

impl Default for StoreOptions {
    /// Eight connections, five seconds' wait, five seconds to connect, thirty seconds per
    /// statement.
    fn default() -> Self {
        Self {
            max_connections: 8,
            wait_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            tls: PgTlsOptions::default(),
        }
    }
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The url does not start with `<scheme>://`.
    #[error("database url has no scheme; expected sqlite://<path> or postgres://<server>")]
    MissingScheme,
    /// The url names a database this service cannot talk to.
    #[error(
        "unsupported database url scheme {scheme:?}; expected sqlite://<path> or postgres://<server>"
    )]
    UnsupportedScheme {
        /// The scheme found in the url (never the rest of it, which may hold a password).
        scheme: String,
    },
    /// The PostgreSQL url cannot be read.
    #[error("invalid postgresql url: {0}")]
    InvalidPostgresUrl(&'static str),
    /// The TLS settings of the PostgreSQL url and options cannot work (a verify mode without
    /// a CA, a file that cannot be read or holds no certificate, two files for one setting).
    #[error("invalid postgresql TLS settings: {0}")]
    InvalidTls(String),
    /// No connection to the PostgreSQL server could be made, or its session settings could
    /// not be applied.
    #[error("cannot connect to postgresql at {server}")]
    PostgresConnect {
        /// Hosts, ports and database of the url (never the user or the password).
        server: String,
        /// What the driver or the server said.
        #[source]
        source: diesel::ConnectionError,
    },
    /// The SQLite url is not `sqlite://<path>` with a usable path.
    #[error("invalid sqlite url: {0}")]
    InvalidSqliteUrl(&'static str),
    /// The pool options cannot work.
    #[error("invalid store options: {0}")]
    InvalidOptions(&'static str),
    /// The directory that should hold the database file could not be created.
    #[error("cannot create database directory {}", path.display())]
    CreateDirectory {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened or its session settings could not be applied.
    #[error("cannot open database {}", path.display())]
    Connect {
        /// The database file.
        path: PathBuf,
        /// What the driver said.
        #[source]
        source: diesel::ConnectionError,
    },
    /// A migration failed.
    #[error("cannot apply database migrations")]
    Migrate(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// The connection pool could not be built.
    #[error("cannot build the connection pool")]
    Pool(#[source] deadpool::managed::BuildError),
    /// The freshly built pool could not hand out a working connection.
    #[error("the new database pool does not answer")]
    Check(#[source] domain::StoreError),
    /// The blocking task that sets the database up failed.
    #[error("database setup task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Opens the store named by `url` and applies its pending migrations.
///
/// `url` is `sqlite://<path>` (relative, as in `sqlite://data/callback-service.db`, or
/// absolute, as in `sqlite:///var/lib/callback-service/db`); the file and its parent
/// directory are created when missing. `postgres://…` and `postgresql://…` urls open
/// a [`PgStore`] on that database, which must exist; a PostgreSQL server that is not
/// reachable yet is waited for in the background ([`PgStore::open_eventually`]). No error
/// repeats the url's password.
pub async fn open(url: &str, options: &StoreOptions) -> Result<Arc<dyn Database>, OpenError> {
    match DatabaseUrl::parse(url)? {
        DatabaseUrl::Sqlite(path) => Ok(Arc::new(SqliteStore::open(path, options).await?)),
        DatabaseUrl::Postgres => Ok(Arc::new(PgStore::open_eventually(url, options).await?)),
    }
}

/// Whether the database `url` names serves a single service instance, which may then free
/// every inbox lease at start (`Inbox::release(None)`): true for SQLite, false for
/// PostgreSQL (several instances share it) and for a url [`open`] refuses.
///
/// An embedded SQLite file belongs to the one process that opens it: the leases found at
/// start were held by that process's previous run, which is gone.
pub fn is_single_instance(url: &str) -> bool {
    matches!(DatabaseUrl::parse(url), Ok(DatabaseUrl::Sqlite(_)))
}

/// A database url, split by backend.
#[derive(Debug, PartialEq, Eq)]
enum DatabaseUrl {
    /// `sqlite://<path>`.
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`.
    Postgres,
}

impl DatabaseUrl {
    fn parse(url: &str) -> Result<Self, OpenError> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(OpenError::MissingScheme);
        };
        // Only a plausible scheme is echoed back: a url without `://` in the expected place
        // could put anything, a password included, before the first `://`.
        let plausible = !scheme.is_empty()
            && scheme.len() <= 32
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !plausible {
            return Err(OpenError::MissingScheme);
        }
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => Ok(Self::Sqlite(sqlite_path(rest)?)),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            _ => Err(OpenError::UnsupportedScheme {
                scheme: scheme.to_owned(),
            }),
        }
    }
}

fn sqlite_path(rest: &str) -> Result<PathBuf, OpenError> {
    if rest.is_empty() {
        return Err(OpenError::InvalidSqliteUrl("it names no file"));
    }
    if rest == ":memory:" || rest.starts_with("file:") {
        // An in-memory database would be a different, empty database on every pooled
        // connection, and `file:` uri options would bypass the session settings.
        return Err(OpenError::InvalidSqliteUrl(
            "only a file path is supported, not :memory: or file: uris",
        ));
    }
    if rest.contains('?') {
        return Err(OpenError::InvalidSqliteUrl(
            "options after '?' are not supported",
        ));
    }
    if rest.ends_with('/') {
        return Err(OpenError::InvalidSqliteUrl(
            "it names a directory, not a file",
        ));
    }
    Ok(PathBuf::from(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_give_relative_and_absolute_paths() {
        assert_eq!(
            DatabaseUrl::parse("sqlite://data/callback-service.db").unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("data/callback-service.db"))
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite:///tmp/x.db").unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("/tmp/x.db"))
        );
        assert_eq!(
            DatabaseUrl::parse("SQLite://x.db").unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("x.db"))
        );
    }

    #[test]
    fn postgres_urls_are_recognised() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/postgres",
            "postgresql://u:secret@db/app",
        ] {
            assert_eq!(DatabaseUrl::parse(url).unwrap(), DatabaseUrl::Postgres);
        }
    }

    #[test]
    fn bad_urls_name_the_scheme_but_never_the_rest() {
        let err = DatabaseUrl::parse("mysql://root:hunter2@db/app").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("\"mysql\""), "{message}");
        assert!(!message.contains("hunter2"), "{message}");

        for url in ["data/x.db", "", "user:hunter2@host", "a b://x", "://x"] {
            let err = DatabaseUrl::parse(url).unwrap_err();
            assert!(matches!(err, OpenError::MissingScheme), "{url:?}: {err}");
            assert!(!err.to_string().contains("hunter2"));
        }
    }

    #[test]
    fn only_sqlite_serves_a_single_instance() {
        assert!(is_single_instance("sqlite://data/callback-service.db"));
        assert!(is_single_instance("SQLITE:///var/lib/x.db"));
        assert!(!is_single_instance(
            "postgres://postgres@127.0.0.1:5432/postgres"
        ));
        assert!(!is_single_instance("postgresql://db/app"));
        assert!(!is_single_instance("sqlite://"));
        assert!(!is_single_instance("mysql://db/app"));
        assert!(!is_single_instance("data/x.db"));
    }

    #[test]
    fn sqlite_urls_must_name_a_file() {
        for url in [
            "sqlite://",
            "sqlite://:memory:",
            "sqlite://file:x.db?mode=memory",
            "sqlite://x.db?mode=rwc",
            "sqlite://data/",
        ] {
            assert!(
                matches!(DatabaseUrl::parse(url), Err(OpenError::InvalidSqliteUrl(_))),
                "{url:?} should be refused"
            );
        }
    }
}
