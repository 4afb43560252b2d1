//! A PostgreSQL server of the test's own that speaks TLS only: certificates made by the
//! test (`tls::testing`), `ssl = on`, and a `pg_hba.conf` of `hostssl` lines alone, so any
//! connection that is not encrypted is refused.

use std::path::PathBuf;

use crate::pg_cluster::{Cluster, ServerTls, Setup};

/// The role that must log in with a client certificate (`cert` authentication); every
/// other role is trusted over TLS.
pub const CERT_USER: &str = "certuser";

/// `hostssl` only: `certuser` by certificate, everyone else trusted, nothing in clear.
const HBA: &str = "\
hostssl all certuser 127.0.0.1/32 cert
hostssl all certuser ::1/128 cert
hostssl all all 127.0.0.1/32 trust
hostssl all all ::1/128 trust
";

/// The running server and the files a client needs.
#[derive(Debug)]
pub struct TlsPostgres {
    /// The server (stopped when this is dropped).
    pub cluster: Cluster,
    /// The CA that signed the server's certificate (issued for `localhost` only, not for
    /// `127.0.0.1`, so `verify-full` can be shown to check the name).
    pub ca_file: PathBuf,
    /// A CA that signed nothing the server shows.
    pub wrong_ca_file: PathBuf,
    /// A client certificate for [`CERT_USER`], signed by [`TlsPostgres::ca_file`]'s CA.
    pub client: tls::Identity,
    _dir: tempfile::TempDir,
}

impl TlsPostgres {
    /// Starts the server; `None` (with the skip printed) when no PostgreSQL server is
    /// installed and `REQUIRE_POSTGRES` does not ask for one.
    pub async fn start() -> anyhow::Result<Option<Self>> {
        if let Err(err) = crate::pg_cluster::find_bin() {
            if storage_required() {
                anyhow::bail!("REQUIRE_POSTGRES is set but {err:#}");
            }
            eprintln!("SKIPPED: PostgreSQL over TLS: {err:#}");
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        let pki = tls::testing::TestPki::new(dir.path(), "postgres");
        let wrong = tls::testing::TestPki::new(dir.path(), "wrong");
        let server = pki.server("server", &["localhost"]);
        let client = pki.client("client", CERT_USER);
        let ca_file = pki.ca_file().to_owned();
        let setup_ca = ca_file.clone();
        let cluster = tokio::task::spawn_blocking(move || {
            Cluster::start(&Setup {
                name: "tls",
                hba: Some(HBA),
                tls: Some(ServerTls {
                    cert_file: &server.cert_file,
                    key_file: &server.key_file,
                    ca_file: Some(&setup_ca),
                }),
                ..Setup::default()
            })
        })
        .await??;
        let this = Self {
            cluster,
            ca_file,
            wrong_ca_file: wrong.ca_file().to_owned(),
            client,
            _dir: dir,
        };
        let admin =
            storage::testing::connect(&this.url("localhost", "postgres", "sslmode=require"))
                .await
                .map_err(|err| anyhow::anyhow!("{err}"))?;
        admin
            .batch_execute(&format!("CREATE ROLE {CERT_USER} LOGIN SUPERUSER"))
            .await?;
        Ok(Some(this))
    }

    /// `postgres://postgres@{host}:{port}/{database}?{params}`.
    pub fn url(&self, host: &str, database: &str, params: &str) -> String {
        self.url_as("postgres", host, database, params)
    }

    /// [`TlsPostgres::url`] for another role.
    pub fn url_as(&self, user: &str, host: &str, database: &str, params: &str) -> String {
        let port = self.cluster.port();
        let query = if params.is_empty() {
            String::new()
        } else {
            format!("?{params}")
        };
        format!("postgres://{user}@{host}:{port}/{database}{query}")
    }

    /// `sslmode=verify-full&sslrootcert=<the right CA>`.
    pub fn verify_full(&self) -> String {
        format!("sslmode=verify-full&sslrootcert={}", self.ca_file.display())
    }
}

/// Whether `REQUIRE_POSTGRES` asks for a failure instead of a skip.
fn storage_required() -> bool {
    std::env::var("REQUIRE_POSTGRES")
        .is_ok_and(|value| matches!(value.trim(), "1" | "true" | "yes"))
}
