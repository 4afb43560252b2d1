//! The real service with TLS on both listeners (`http.tls_*`, `admin.tls_*`), certificates
//! from a throwaway CA: callbacks are taken over HTTPS (HTTP/2 by ALPN), a certificate
//! renewed on disk is presented to new connections without a restart (by polling, and by
//! `SIGHUP`), files that cannot be used keep the previous certificate, and unusable files
//! at start stop the service with the file named.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use tests::{Backend, Process, Service, Upstream, bins, bounded, eventually};
use tls::testing::TestPki;
use tls::{ClientSettings, Identity, Roots, Verification};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const TEST_DEADLINE: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

/// The names the listeners' certificates are issued for.
const NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

fn client_config(ca: &Path) -> anyhow::Result<tls::rustls::ClientConfig> {
    let mut config = tls::client_config(&ClientSettings {
        verification: Verification::Full,
        roots: Roots::File(ca.to_owned()),
        identity: None,
    })?;
    config.alpn_protocols = tls::http_alpn();
    Ok(config)
}

/// An HTTPS client that trusts only `ca`, opening a new connection for every request.
fn https(ca: &Path) -> anyhow::Result<reqwest::Client> {
    tls::install_default_provider();
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(client_config(ca)?)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// The certificate (DER) a new connection to `addr` is shown, verified against `ca`.
async fn presented(addr: SocketAddr, ca: &Path) -> anyhow::Result<Vec<u8>> {
    let connector = TlsConnector::from(Arc::new(client_config(ca)?));
    let tcp = TcpStream::connect(addr).await?;
    let name = tls::rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let stream =
        tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp)).await??;
    let (_, connection) = stream.get_ref();
    let leaf = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| anyhow::anyhow!("no certificate presented"))?;
    Ok(leaf.to_vec())
}

fn der(identity: &Identity) -> anyhow::Result<Vec<u8>> {
    Ok(tls::read_certificates("certificate file", &identity.cert_file)?[0].to_vec())
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("https://{addr}{path}")
}

/// Waits until new connections to `addr` are shown `expected`.
async fn wait_until_presented(addr: SocketAddr, ca: &Path, expected: &[u8]) -> anyhow::Result<()> {
    eventually(WAIT, POLL, || async {
        Ok((presented(addr, ca).await? == expected).then_some(()))
    })
    .await
    .with_context(|| format!("{addr} presents the new certificate"))
}

/// The value of the metric series `series` (name and labels, exactly as rendered).
async fn metric(client: &reqwest::Client, admin: SocketAddr, series: &str) -> anyhow::Result<f64> {
    let text = client
        .get(url(admin, "/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no series {series} in:\n{text}"))
}

async fn start(
    upstream: &Upstream,
    identity: &Identity,
    reload_interval_ms: &str,
) -> anyhow::Result<Service> {
    let cert = identity.cert_file.display().to_string();
    let key = identity.key_file.display().to_string();
    Service::start(
        Backend::Sqlite,
        &upstream.base_url(),
        Duration::from_secs(300),
        &[
            ("CALLBACK_HTTP__TLS_CERT_FILE", &cert),
            ("CALLBACK_HTTP__TLS_KEY_FILE", &key),
            ("CALLBACK_ADMIN__TLS_CERT_FILE", &cert),
            ("CALLBACK_ADMIN__TLS_KEY_FILE", &key),
            ("CALLBACK_HTTP__TLS_RELOAD_INTERVAL_MS", reload_interval_ms),
        ],
    )
    .await?
    .ok_or_else(|| anyhow::anyhow!("SQLite always runs"))
}

/// The service with TLS on both listeners, its CA and a client that trusts it.
struct Running {
    _dir: tempfile::TempDir,
    pki: TestPki,
    identity: Identity,
    _upstream: Upstream,
    service: Service,
    client: reqwest::Client,
}

impl Running {
    async fn start(reload_interval_ms: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = TestPki::new(dir.path(), "api");
        let identity = pki.server("api", &NAMES);
        let upstream = Upstream::start(1, 5).await?;
        let service = start(&upstream, &identity, reload_interval_ms).await?;
        let client = https(pki.ca_file())?;
        Ok(Self {
            _dir: dir,
            pki,
            identity,
            _upstream: upstream,
            service,
            client,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_over_https_and_a_renewed_certificate_is_served_without_a_restart()
-> anyhow::Result<()> {
    // The binaries are built (once per test process) before the clock starts.
    bins();
    bounded(TEST_DEADLINE, async {
        // Every field bound: the directory and the upstream live as long as the test.
        let Running {
            _dir,
            _upstream,
            pki,
            identity,
            service,
            client,
        } = Running::start("100").await?;

        let answer = client
            .post(url(service.api, "/callback"))
            .json(&json!({ "object_ids": [2, 4] }))
            .send()
            .await?;
        assert_eq!(answer.status(), 202);
        assert_eq!(answer.version(), reqwest::Version::HTTP_2, "h2 by ALPN");
        for id in [2, 4] {
            eventually(WAIT, POLL, || async {
                let status = client
                    .get(url(service.api, &format!("/objects/{id}")))
                    .send()
                    .await?
                    .status();
                Ok((status == 200).then_some(()))
            })
            .await
            .with_context(|| format!("object {id} stored"))?;
        }

        // Plain HTTP to a TLS listener gets no answer, and the failed handshake is counted.
        let plain = tests::http().get(service.url("/")).send().await;
        assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
        let refused = r#"tls_handshake_failures_total{listener="api",reason="refused"}"#;
        eventually(WAIT, POLL, || async {
            Ok((metric(&client, service.admin, refused).await? >= 1.0).then_some(()))
        })
        .await
        .context("the refused handshake counted")?;

        // A renewal writes a new certificate and key over the same files.
        let first = der(&identity)?;
        assert_eq!(presented(service.api, pki.ca_file()).await?, first);
        let renewed = pki.server("api", &NAMES);
        let second = der(&renewed)?;
        assert_ne!(first, second);
        wait_until_presented(service.api, pki.ca_file(), &second).await?;
        wait_until_presented(service.admin, pki.ca_file(), &second).await?;
        let replaced = r#"tls_reloads_total{listener="api",outcome="replaced"}"#;
        assert!(metric(&client, service.admin, replaced).await? >= 1.0);
        assert!(
            service
                .process
                .lines()
                .iter()
                .any(|l| l.contains("certificate reloaded")),
            "the reload is logged"
        );
        // The same process all along: the callback taken before is still there.
        let status = client
            .get(url(service.api, "/objects/2"))
            .send()
            .await?
            .status();
        assert_eq!(status, 200);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_unusable_files_keep_the_previous_one()
-> anyhow::Result<()> {
    // The binaries are built (once per test process) before the clock starts.
    bins();
    bounded(TEST_DEADLINE, async {
        // No polling: only SIGHUP reads the files again. Every field bound: the directory
        // and the upstream live as long as the test.
        let Running {
            _dir,
            _upstream,
            pki,
            identity,
            mut service,
            client,
        } = Running::start("0").await?;
        let first = der(&identity)?;
        assert_eq!(presented(service.api, pki.ca_file()).await?, first);

        // Half a renewal: a certificate file that holds none. SIGHUP reads it, refuses it,
        // and the previous certificate is still presented.
        std::fs::write(
            &identity.cert_file,
            "-----BEGIN CERTIFICATE-----\ntruncated",
        )?;
        service.process.signal("HUP")?;
        service
            .process
            .wait_for_line(WAIT, |l| {
                l.contains("certificate reload failed").then_some(())
            })
            .await?;
        assert_eq!(presented(service.api, pki.ca_file()).await?, first);
        let failed = r#"tls_reloads_total{listener="api",outcome="failed"}"#;
        assert!(metric(&client, service.admin, failed).await? >= 1.0);

        // The renewal completes; the next SIGHUP takes it.
        let renewed = pki.server("api", &NAMES);
        let second = der(&renewed)?;
        service.process.signal("HUP")?;
        wait_until_presented(service.api, pki.ca_file(), &second).await?;
        wait_until_presented(service.admin, pki.ca_file(), &second).await?;
        let answer = client
            .post(url(service.api, "/callback"))
            .json(&json!({ "object_ids": [8] }))
            .send()
            .await?;
        assert_eq!(answer.status(), 202);

        // SIGHUP never stops the service; SIGTERM still does, cleanly.
        service.process.signal("TERM")?;
        let status = service.process.wait(WAIT).await?;
        assert!(status.success(), "stopped with {status}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_certificate_stops_the_service_at_start_naming_the_file() -> anyhow::Result<()>
{
    bins();
    bounded(TEST_DEADLINE, async {
        let dir = tempfile::tempdir()?;
        let pki = TestPki::new(dir.path(), "api");
        let identity = pki.server("api", &NAMES);
        let other = pki.server("other", &NAMES);
        let cases = [
            (
                "CALLBACK_HTTP__TLS_CERT_FILE",
                dir.path().join("missing.pem"),
                "cannot read the certificate file",
            ),
            (
                "CALLBACK_HTTP__TLS_KEY_FILE",
                other.key_file.clone(),
                "cannot be used",
            ),
            (
                "CALLBACK_ADMIN__TLS_CERT_FILE",
                pki.ca_file().with_extension("nothing"),
                "cannot read the certificate file",
            ),
        ];
        for (key, file, cause) in cases {
            let mut command = tokio::process::Command::new(&bins().callback_service);
            command
                .current_dir(dir.path())
                .env("CALLBACK_HTTP__LISTEN", "127.0.0.1:0")
                .env("CALLBACK_ADMIN__LISTEN", "127.0.0.1:0")
                .env("CALLBACK_DATABASE__URL", "sqlite://data/db.sqlite")
                .env("CALLBACK_HTTP__TLS_CERT_FILE", &identity.cert_file)
                .env("CALLBACK_HTTP__TLS_KEY_FILE", &identity.key_file)
                .env("CALLBACK_ADMIN__TLS_KEY_FILE", &identity.key_file)
                .env("CALLBACK_ADMIN__TLS_CERT_FILE", &identity.cert_file)
                .env(key, &file);
            let mut process = Process::spawn(command)?;
            let status = process.wait(WAIT).await?;
            let lines = process.lines().join("\n");
            assert!(!status.success(), "{key}: started anyway:\n{lines}");
            let section = if key.contains("ADMIN") {
                "admin"
            } else {
                "http"
            };
            for expected in [
                format!("{section}.tls_cert_file"),
                cause.to_owned(),
                file.display().to_string(),
            ] {
                assert!(
                    lines.contains(&expected),
                    "{key}: no {expected:?} in:\n{lines}"
                );
            }
        }
        Ok(())
    })
    .await
}
