//! Harness for the end-to-end tests: builds the real binaries once, runs them on free
//! loopback ports with a temporary SQLite database, and stops them when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use diesel::{Connection, SqliteConnection};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

pub mod pg_cluster;
pub mod proxy;
pub mod scrape;
pub mod tls_postgres;
pub mod traces;

pub use proxy::Proxy;

/// How long a process may take to start listening.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// The paths of the two binaries, built once per test process.
#[derive(Debug)]
pub struct Bins {
    /// `callback-service`.
    pub callback_service: PathBuf,
    /// `client-service`.
    pub client_service: PathBuf,
}

/// `relative` (e.g. `docs/openapi.json`) under the workspace root.
pub fn workspace_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .join(relative)
}

/// The text of the workspace file `relative`.
pub fn read_workspace_file(relative: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(workspace_file(relative))
        .map_err(|err| anyhow::anyhow!("read {relative}: {err}"))
}

/// Builds both binaries with the profile of the running tests (once) and returns their paths.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        // target/<profile>/deps/<test binary> → target/<profile>
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = std::process::Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "callback-service",
                "-p",
                "client-service",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("cargo build runs");
        assert!(status.success(), "building the binaries failed: {status}");
        Bins {
            callback_service: profile_dir.join("callback-service"),
            client_service: profile_dir.join("client-service"),
        }
    })
}

/// The wall clock as microseconds since the Unix epoch, like the service's timestamps.
pub fn now_micros() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since.as_micros()).expect("fits")
}

/// Parses an RFC 3339 time as the service prints it into microseconds since the Unix epoch.
pub fn parse_rfc3339_micros(text: &str) -> anyhow::Result<i64> {
    let parsed = chrono::DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("not an RFC 3339 time: {text:?}"))?;
    Ok(parsed.timestamp_micros())
}

/// A running child process whose stderr and stdout lines are collected.
#[derive(Debug)]
pub struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: watch::Receiver<usize>,
}

impl Process {
    /// Spawns `command` with piped output; the process is killed if the test drops it.
    pub fn spawn(mut command: Command) -> anyhow::Result<Self> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().context("spawn")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, new_line) = watch::channel(0usize);
        let tx = Arc::new(tx);
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        collect(stdout, Arc::clone(&lines), Arc::clone(&tx));
        collect(stderr, Arc::clone(&lines), tx);
        Ok(Self {
            child,
            lines,
            new_line,
        })
    }

    /// The operating system's id of the process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines lock").clone()
    }

    /// Waits until a printed line satisfies `pick`, returning what it picked.
    pub async fn wait_for_line<T>(
        &mut self,
        deadline: Duration,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> anyhow::Result<T> {
        let waiting = async {
            loop {
                if let Some(found) = self.lines().iter().find_map(|l| pick(l)) {
                    return Ok(found);
                }
                if self.new_line.changed().await.is_err() {
                    bail!("the process closed its output");
                }
            }
        };
        match tokio::time::timeout(deadline, waiting).await {
            Ok(found) => found,
            Err(_) => bail!(
                "no matching line within {deadline:?}; output:\n{}",
                self.lines().join("\n")
            ),
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already gone")?;
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .context("run kill")?;
        if !status.success() {
            bail!("kill -{name} {pid} failed: {status}");
        }
        Ok(())
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!(
                "still running after {deadline:?}; output:\n{}",
                self.lines().join("\n")
            ),
        }
    }
}

fn collect(
    stream: impl AsyncRead + Unpin + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
    notify: Arc<watch::Sender<usize>>,
) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if std::env::var_os("E2E_ECHO").is_some() {
                eprintln!("{line}");
            }
            let n = {
                let mut all = lines.lock().expect("lines lock");
                all.push(line);
                all.len()
            };
            notify.send_replace(n);
        }
    });
}

/// Finds `key=VALUE` in a log line and parses VALUE as a socket address.
pub fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    if !line.contains(marker) {
        return None;
    }
    line.split_whitespace()
        .filter_map(|word| word.strip_prefix("addr="))
        .find_map(|addr| addr.trim_matches('"').parse().ok())
}

/// `client-service` running only its upstream simulator on a free loopback port.
#[derive(Debug)]
pub struct Upstream {
    /// The process.
    pub process: Process,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Upstream {
    /// Starts the simulator answering after `min_ms..=max_ms`.
    pub async fn start(min_ms: u64, max_ms: u64) -> anyhow::Result<Self> {
        Self::start_with_env(min_ms, max_ms, &[]).await
    }

    /// [`Upstream::start`] with extra `CLIENT_…` env.
    pub async fn start_with_env(
        min_ms: u64,
        max_ms: u64,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(&bins().client_service);
        command
            .args(["--no-emitter", "--upstream-listen", "127.0.0.1:0"])
            .args(["--min-latency-ms", &min_ms.to_string()])
            .args(["--max-latency-ms", &max_ms.to_string()])
            .current_dir(std::env::temp_dir())
            .env("RUST_LOG", "info");
        for (key, value) in env {
            command.env(key, value);
        }
        let mut process = Process::spawn(command)?;
        let addr = process
            .wait_for_line(START_DEADLINE, |line| {
                if !line.contains("listening on") {
                    return None;
                }
                line.split_whitespace()
                    .filter_map(|w| {
                        w.trim_matches(|c| c == '"' || c == ',')
                            .parse::<SocketAddr>()
                            .ok()
                    })
                    .next()
            })
            .await?;
        Ok(Self { process, addr })
    }

    /// The base URL to give the service.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Which database a test runs the service on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded SQLite file, the default.
    Sqlite,
    /// A fresh PostgreSQL database on the server of `TEST_DATABASE_URL`.
    Postgres,
    /// A fresh PostgreSQL database on a server of the test's own that accepts TLS only,
    /// reached with `sslmode=verify-full` ([`tls_postgres::TlsPostgres`]).
    PostgresTls,
}

/// The database a [`Service`] runs on; a PostgreSQL one is dropped with it.
#[derive(Debug)]
pub enum Database {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A throwaway PostgreSQL database.
    Postgres(storage::testing::TestDatabase),
    /// A throwaway PostgreSQL database on a TLS-only server of its own, stopped with it
    /// (the database is dropped first: fields drop in order).
    PostgresTls {
        /// The database.
        db: storage::testing::TestDatabase,
        /// Its server.
        server: Box<tls_postgres::TlsPostgres>,
    },
}

impl Database {
    /// A fresh database of `backend`; `None` when PostgreSQL is not reachable and not
    /// required (the skip has been printed).
    pub async fn create(backend: Backend, dir: &Path) -> Option<Self> {
        match backend {
            Backend::Sqlite => Some(Self::Sqlite(dir.join("data").join("callback-service.db"))),
            Backend::Postgres => storage::testing::TestDatabase::create()
                .await
                .map(Self::Postgres),
            Backend::PostgresTls => {
                let server = match tls_postgres::TlsPostgres::start().await {
                    Ok(Some(server)) => server,
                    Ok(None) => return None,
                    Err(err) => panic!("cannot start PostgreSQL over TLS: {err:#}"),
                };
                let url = server.url("localhost", "postgres", &server.verify_full());
                let db = storage::testing::TestDatabase::create_on(&url)
                    .await
                    .unwrap_or_else(|err| panic!("cannot create a database over TLS: {err}"));
                Some(Self::PostgresTls {
                    db,
                    server: Box::new(server),
                })
            }
        }
    }

    /// The `database.url` to give the service.
    pub fn url(&self) -> String {
        match self {
            Self::Sqlite(path) => format!("sqlite://{}", path.display()),
            Self::Postgres(db) | Self::PostgresTls { db, .. } => db.url.clone(),
        }
    }

    /// Ids of the rows physically in the `objects` table, deleted or not by expiry rules.
    pub async fn physical_ids(&self) -> anyhow::Result<Vec<i64>> {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            id: i64,
        }
        const QUERY: &str = "SELECT id FROM objects ORDER BY id";
        match self {
            Self::Sqlite(path) => {
                let mut conn = SqliteConnection::establish(&path.display().to_string())?;
                diesel::RunQueryDsl::execute(
                    diesel::sql_query("PRAGMA busy_timeout = 5000"),
                    &mut conn,
                )?;
                let rows: Vec<Row> =
                    diesel::RunQueryDsl::load(diesel::sql_query(QUERY), &mut conn)?;
                Ok(rows.into_iter().map(|r| r.id).collect())
            }
            Self::Postgres(db) | Self::PostgresTls { db, .. } => {
                // The store's own connector, so a TLS url works as it does for the service.
                let client = storage::testing::connect(&db.url)
                    .await
                    .map_err(|err| anyhow::anyhow!("{err}"))?;
                let rows = client.query(QUERY, &[]).await?;
                Ok(rows.iter().map(|row| row.get::<_, i64>(0)).collect())
            }
        }
    }

    /// How many ids have more than one row (must always be 0).
    pub async fn duplicated_ids(&self) -> anyhow::Result<usize> {
        let ids = self.physical_ids().await?;
        let distinct: std::collections::BTreeSet<i64> = ids.iter().copied().collect();
        Ok(ids.len() - distinct.len())
    }
}

/// `callback-service` on free loopback ports with its own database.
#[derive(Debug)]
pub struct Service {
    /// The process.
    pub process: Process,
    /// The public API.
    pub api: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The database it runs on, shared with the instances started by [`Service::another`].
    pub database: Arc<Database>,
    dir: Arc<tempfile::TempDir>,
    env: Vec<(String, String)>,
    /// Its `pipeline.instance_id`: every instance the harness starts on one machine has a
    /// name of its own, except a [`Service::restarted`] one, which keeps its predecessor's.
    pub instance_id: String,
}

/// A `pipeline.instance_id` no other instance of this test process has.
fn fresh_instance_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("test-{}-{n}", std::process::id())
}

impl Service {
    /// Starts the service on a fresh database of `backend` against `upstream` with the
    /// given TTL and extra `CALLBACK_…` env; `None` when the backend is PostgreSQL and
    /// none is reachable.
    pub async fn start(
        backend: Backend,
        upstream: &str,
        ttl: Duration,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Option<Self>> {
        let dir = Arc::new(tempfile::tempdir()?);
        let Some(database) = Database::create(backend, dir.path()).await else {
            return Ok(None);
        };
        let mut all = vec![
            ("CALLBACK_DATABASE__URL".to_owned(), database.url()),
            (
                "CALLBACK_UPSTREAM__BASE_URL".to_owned(),
                upstream.to_owned(),
            ),
            (
                "CALLBACK_EXPIRY__TTL_MS".to_owned(),
                ttl.as_millis().to_string(),
            ),
        ];
        all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        Self::spawn(Arc::new(database), dir, all, fresh_instance_id())
            .await
            .map(Some)
    }

    /// Starts the service on `database`, which it reaches at `database_url` (the
    /// database's own [`Database::url`], or the same database through a [`Proxy`]),
    /// against `upstream` with the given TTL and extra `CALLBACK_…` env; the harness
    /// reads the database at its own url, past any proxy.
    pub async fn start_with(
        database: Database,
        database_url: &str,
        upstream: &str,
        ttl: Duration,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = Arc::new(tempfile::tempdir()?);
        let mut all = vec![
            ("CALLBACK_DATABASE__URL".to_owned(), database_url.to_owned()),
            (
                "CALLBACK_UPSTREAM__BASE_URL".to_owned(),
                upstream.to_owned(),
            ),
            (
                "CALLBACK_EXPIRY__TTL_MS".to_owned(),
                ttl.as_millis().to_string(),
            ),
        ];
        all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        Self::spawn(Arc::new(database), dir, all, fresh_instance_id()).await
    }

    /// Another instance on the same database with the same settings, fresh ports and a
    /// name of its own: a second instance beside this one, or a replacement on another
    /// machine after a kill.
    pub async fn another(&self) -> anyhow::Result<Self> {
        Self::spawn(
            Arc::clone(&self.database),
            Arc::clone(&self.dir),
            self.env.clone(),
            fresh_instance_id(),
        )
        .await
    }

    /// This instance started again (after a kill, say): the same settings and the same
    /// `pipeline.instance_id`, fresh ports.
    pub async fn restarted(&self) -> anyhow::Result<Self> {
        Self::spawn(
            Arc::clone(&self.database),
            Arc::clone(&self.dir),
            self.env.clone(),
            self.instance_id.clone(),
        )
        .await
    }

    async fn spawn(
        database: Arc<Database>,
        dir: Arc<tempfile::TempDir>,
        env: Vec<(String, String)>,
        instance_id: String,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(&bins().callback_service);
        command
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .env("CALLBACK_HTTP__LISTEN", "127.0.0.1:0")
            .env("CALLBACK_ADMIN__LISTEN", "127.0.0.1:0")
            .env("CALLBACK_PIPELINE__INSTANCE_ID", &instance_id)
            // The tests that stop a service with SIGTERM test the drain, not the delay
            // before it (tests/tests/probes.rs sets one).
            .env("CALLBACK_HTTP__SHUTDOWN_DELAY_MS", "0");
        for (key, value) in &env {
            command.env(key, value);
        }
        let mut process = Process::spawn(command)?;
        let api = process
            .wait_for_line(START_DEADLINE, |l| addr_after(l, "api listening"))
            .await?;
        let admin = process
            .wait_for_line(START_DEADLINE, |l| addr_after(l, "admin listening"))
            .await?;
        Ok(Self {
            process,
            api,
            admin,
            database,
            dir,
            env,
            instance_id,
        })
    }

    /// Kills the process with SIGKILL and waits until it is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.process.signal("KILL")?;
        self.process.wait(Duration::from_secs(10)).await?;
        Ok(())
    }

    /// Posts `{"object_ids": ids}` to `POST /callback` and fails unless it is accepted
    /// (`202`).
    pub async fn accept_callback(&self, ids: &[i64]) -> anyhow::Result<()> {
        let response = http()
            .post(self.url("/callback"))
            .json(&serde_json::json!({ "object_ids": ids }))
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 202,
            "callback of {ids:?} answered {}",
            response.status()
        );
        Ok(())
    }

    /// `http://<api>{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// `http://<admin>{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The working directory of the process.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Ids of the rows physically in the `objects` table.
    pub async fn physical_ids(&self) -> anyhow::Result<Vec<i64>> {
        self.database.physical_ids().await
    }
}

/// Runs client-service's emitter against `service` for two rounds 200 ms apart (no upstream
/// of its own, extra `CLIENT_…` env from `env`) and checks what it reports: it exits 0,
/// and each round's line says `status=202` and that every even id it sent is stored.
/// Returns every line it printed.
pub async fn emit_two_rounds(
    service: &Service,
    env: &[(&str, &str)],
    deadline: Duration,
) -> anyhow::Result<Vec<String>> {
    let mut command = Command::new(&bins().client_service);
    command
        .current_dir(service.dir())
        .args(["--no-upstream", "--target", &service.url("/callback")])
        .args(["--interval-ms", "200", "--rounds", "2"])
        .env("CLIENT_EMITTER__REPORT_DELAY_MS", "500")
        .env("RUST_LOG", "warn");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut client = Process::spawn(command)?;
    let exit = client.wait(deadline).await?;
    anyhow::ensure!(
        exit.code() == Some(0),
        "client-service exited with {exit}:\n{}",
        client.lines().join("\n")
    );
    let reports: Vec<String> = client
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("round="))
        .collect();
    anyhow::ensure!(reports.len() == 2, "one report line per round: {reports:?}");
    for report in &reports {
        anyhow::ensure!(report.contains("status=202"), "{report}");
        let stored = report
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("stored_even="))
            .context("stored_even in the report")?;
        let (seen, sent) = stored.split_once('/').context("stored_even=N/M")?;
        anyhow::ensure!(seen == sent, "every even id sent is stored: {report}");
    }
    Ok(client.lines())
}

/// Expands to one `#[tokio::test]` per backend that runs `$case(Backend::…)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($case:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    super::$case($crate::Backend::Sqlite).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    super::$case($crate::Backend::Postgres).await
                }
            )+
        }
    };
}

/// The `content-type` of `response`, empty when it has none (or not as text).
pub fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// A shared HTTP client with a per-request timeout, so no test can hang on a request.
pub fn http() -> reqwest::Client {
    // reqwest has no rustls provider of its own (see the workspace manifest).
    tls::install_default_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// Runs `test` within `deadline` (a hang fails the test instead of stalling the run), and
/// says on stderr how long it took.
pub async fn bounded(
    deadline: Duration,
    test: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let result = tokio::time::timeout(deadline, test)
        .await
        .map_err(|_| anyhow::anyhow!("the test did not finish within {deadline:?}"));
    eprintln!(
        "{} took {:.1?}",
        std::thread::current().name().unwrap_or("a test"),
        started.elapsed()
    );
    result?
}

/// Polls `check` until it returns `Some`, or fails after `deadline`.
pub async fn eventually<T, F, Fut>(
    deadline: Duration,
    every: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(found) = check().await? {
            return Ok(found);
        }
        if tokio::time::Instant::now() >= give_up {
            bail!("condition not met within {deadline:?}");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_parsing_matches_known_instants() {
        assert_eq!(parse_rfc3339_micros("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_rfc3339_micros("1970-01-01T00:00:01.5Z").unwrap(),
            1_500_000
        );
        assert_eq!(
            parse_rfc3339_micros("2026-11-25T12:00:00.123456Z").unwrap(),
            1_795_608_000_123_456
        );
        assert!(parse_rfc3339_micros("2026-11-25 12:00").is_err());
    }

    #[test]
    fn addresses_are_found_in_log_lines() {
        let line = "2026-11-25T12:00:00Z  INFO callback_service: api listening addr=127.0.0.1:4242";
        assert_eq!(
            addr_after(line, "api listening"),
            Some("127.0.0.1:4242".parse().unwrap())
        );
        assert_eq!(addr_after(line, "admin listening"), None);
    }
}
