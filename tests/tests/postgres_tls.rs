//! PostgreSQL over TLS with the real binary: a server of the test's own with `ssl = on` and
//! a `pg_hba.conf` that accepts `hostssl` connections only (`tests::tls_postgres`), and
//! certificates made by the test.
//!
//! - `sslmode=require`, `verify-ca` and `verify-full` work: a callback's online id is stored;
//! - a wrong CA, a certificate for another host under `verify-full`, a `verify-*` mode
//!   without a CA and `sslmode=disable` stop the service at start, naming the cause;
//! - a client certificate logs in a role that the server authenticates by certificate.
//!
//! The durability test runs over TLS too (`durability.rs`, `Backend::PostgresTls`).

use std::time::Duration;

use serde_json::json;
use tests::tls_postgres::{CERT_USER, TlsPostgres};
use tests::{Database, Process, Service, Upstream, bins, bounded, eventually, http};

const TEST_DEADLINE: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(30);

/// Posts a callback naming `id` (even: online) and waits until it is stored.
async fn stores_an_id(service: &Service, id: i64) -> anyhow::Result<()> {
    let answer = http()
        .post(service.url("/callback"))
        .json(&json!({ "object_ids": [id] }))
        .send()
        .await?;
    anyhow::ensure!(
        answer.status() == 202,
        "callback answered {}",
        answer.status()
    );
    eventually(WAIT, Duration::from_millis(50), || async {
        let status = http()
            .get(service.url(&format!("/objects/{id}")))
            .send()
            .await?
            .status();
        Ok((status == 200).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_runs_over_tls_with_require_verify_ca_and_verify_full() -> anyhow::Result<()> {
    // The binaries are built (once per test process) before the clock starts.
    tests::bins();
    bounded(TEST_DEADLINE, async {
        let Some(server) = TlsPostgres::start().await? else {
            return Ok(());
        };
        let upstream = Upstream::start(0, 5).await?;
        let admin_url = server.url("127.0.0.1", "postgres", "sslmode=require");
        let ca = server.ca_file.display().to_string();
        let cases = [
            ("require", "127.0.0.1", "sslmode=require".to_owned()),
            (
                "verify-ca",
                "127.0.0.1",
                format!("sslmode=verify-ca&sslrootcert={ca}"),
            ),
            ("verify-full", "localhost", server.verify_full()),
        ];
        for (n, (mode, host, params)) in cases.into_iter().enumerate() {
            let db = storage::testing::TestDatabase::create_on(&admin_url)
                .await
                .map_err(|err| anyhow::anyhow!("{err}"))?;
            let url = server.url(host, &db.name, &params);
            let service = Service::start_with(
                Database::Postgres(db),
                &url,
                &upstream.base_url(),
                Duration::from_secs(300),
                &[],
            )
            .await?;
            stores_an_id(&service, 2 * n as i64 + 2).await?;
            let opened = service
                .process
                .lines()
                .into_iter()
                .find(|line| line.contains("postgresql store opened"))
                .unwrap_or_default();
            assert!(
                opened.contains(&format!("sslmode={mode}")),
                "the start-up line names the mode: {opened}"
            );
            eprintln!("{mode}: stored over TLS");
        }
        Ok(())
    })
    .await
}

/// Starts the service on `url` and expects it to exit at start; its output.
async fn refused_at_start(url: &str, env: &[(&str, &str)]) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let mut command = tokio::process::Command::new(&bins().callback_service);
    command
        .current_dir(dir.path())
        .env("CALLBACK_HTTP__LISTEN", "127.0.0.1:0")
        .env("CALLBACK_ADMIN__LISTEN", "127.0.0.1:0")
        .env("CALLBACK_DATABASE__URL", url)
        .env("CALLBACK_DATABASE__CONNECT_TIMEOUT_MS", "5000");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut process = Process::spawn(command)?;
    // The failure's line first: the output is read on its own tasks, and may lag the exit.
    process
        .wait_for_line(WAIT, |line| {
            (line.contains("callback-service failed") || line.contains("api listening"))
                .then_some(())
        })
        .await?;
    let exit = process.wait(WAIT).await?;
    let output = process.lines().join("\n");
    anyhow::ensure!(!exit.success(), "the service started:\n{output}");
    anyhow::ensure!(
        !output.contains("api listening"),
        "the service listened before failing:\n{output}"
    );
    Ok(output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_work_stop_the_service_at_start_with_their_cause() -> anyhow::Result<()>
{
    // The binaries are built (once per test process) before the clock starts.
    tests::bins();
    bounded(TEST_DEADLINE, async {
        let Some(server) = TlsPostgres::start().await? else {
            return Ok(());
        };
        let wrong_ca = format!(
            "sslmode=verify-full&sslrootcert={}",
            server.wrong_ca_file.display()
        );
        let cases = [
            (
                "a wrong CA",
                server.url("localhost", "postgres", &wrong_ca),
                vec![
                    "error performing TLS handshake",
                    "UnknownIssuer",
                    "the server's certificate is not signed by the CA given",
                ],
            ),
            (
                "a certificate for another host",
                server.url("127.0.0.1", "postgres", &server.verify_full()),
                vec!["not issued for the host name in the url"],
            ),
            (
                "sslmode=disable on a TLS-only server",
                server.url("127.0.0.1", "postgres", "sslmode=disable"),
                vec!["no pg_hba.conf entry", "no encryption"],
            ),
            (
                "verify-full without a CA",
                server.url("localhost", "postgres", "sslmode=verify-full"),
                vec!["sslmode=verify-full needs the CA"],
            ),
        ];
        for (case, url, causes) in cases {
            let output = refused_at_start(&url, &[]).await?;
            for cause in causes {
                assert!(
                    output.contains(cause),
                    "{case}: the output names {cause:?}:\n{output}"
                );
            }
            assert!(
                !output.contains("retrying in the background"),
                "{case}: a refusal is not waited out:\n{output}"
            );
            eprintln!("{case}: refused at start");
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_logs_in_a_role_authenticated_by_certificate() -> anyhow::Result<()> {
    // The binaries are built (once per test process) before the clock starts.
    tests::bins();
    bounded(TEST_DEADLINE, async {
        let Some(server) = TlsPostgres::start().await? else {
            return Ok(());
        };
        let url = server.url_as(CERT_USER, "localhost", "postgres", &server.verify_full());
        // Without a certificate the server refuses the role: a named, permanent error.
        let err = storage::open(&url, &storage::StoreOptions::default())
            .await
            .expect_err("no client certificate");
        let text = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        assert!(text.contains("certificate"), "{text}");

        // With it, in the url or as store options: the store opens and works.
        let in_url = format!(
            "{url}&sslcert={}&sslkey={}",
            server.client.cert_file.display(),
            server.client.key_file.display()
        );
        let as_options = storage::StoreOptions {
            tls: storage::PgTlsOptions {
                cert_file: Some(server.client.cert_file.clone()),
                key_file: Some(server.client.key_file.clone()),
                ..storage::PgTlsOptions::default()
            },
            ..storage::StoreOptions::default()
        };
        for (url, options) in [
            (in_url.as_str(), storage::StoreOptions::default()),
            (url.as_str(), as_options),
        ] {
            // Opening connects, migrates and checks the connection.
            drop(storage::open(url, &options).await?);
        }
        Ok(())
    })
    .await
}
