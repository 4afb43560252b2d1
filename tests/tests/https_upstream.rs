//! The real service against an `https://` upstream with a private CA: with the CA in
//! `upstream.tls_ca_file` its ids are stored; with another CA every fetch fails with code
//! `tls` and the certificate's fault in the log, and the ids wait for a retry (none is
//! dead-lettered while the setting is fixed).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tests::{Backend, Service, bounded, eventually, http};
use tls::testing::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

const TEST_DEADLINE: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(20);

/// An https upstream on 127.0.0.1 that answers every `GET /objects/{id}` with
/// `{"id":id,"online":true}` over HTTP/1.1 keep-alive; counts the requests it answered.
struct HttpsUpstream {
    port: u16,
    answered: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for HttpsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsUpstream {
    async fn start(identity: &tls::Identity) -> anyhow::Result<Self> {
        let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(identity)?));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let answered = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&answered);
        let task = tokio::spawn(async move {
            // Bounded: the service opens a few connections per test.
            for _ in 0..256 {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = answer_requests(stream, &count).await;
                    }
                });
            }
        });
        Ok(Self {
            port,
            answered,
            task,
        })
    }

    /// The base url under the name the certificate was issued for.
    fn base_url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}

/// Answers the requests of one connection (bodiless GETs) until it closes.
async fn answer_requests(
    mut stream: impl AsyncReadExt + AsyncWriteExt + Unpin,
    answered: &AtomicUsize,
) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    let mut chunk = [0_u8; 4096];
    loop {
        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
            let read = stream.read(&mut chunk).await?;
            if read == 0 || buffer.len() > 64 * 1024 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..read]);
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
        buffer.drain(..end + 4);
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        let id = path.rsplit('/').next().unwrap_or("0");
        let body = format!(r#"{{"id":{id},"online":true}}"#);
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(answer.as_bytes()).await?;
        answered.fetch_add(1, Ordering::Relaxed);
    }
}

async fn service(upstream: &HttpsUpstream, ca: &std::path::Path) -> anyhow::Result<Service> {
    let ca = ca.display().to_string();
    Service::start(
        Backend::Sqlite,
        &upstream.base_url(),
        Duration::from_secs(300),
        &[
            ("CALLBACK_UPSTREAM__TLS_CA_FILE", &ca),
            ("CALLBACK_UPSTREAM__RETRY_DEADLINE_MS", "200"),
            ("CALLBACK_UPSTREAM__RETRY_FIRST_DELAY_MS", "100"),
            ("CALLBACK_UPSTREAM__RETRY_MAX_DELAY_MS", "200"),
        ],
    )
    .await?
    .ok_or_else(|| anyhow::anyhow!("SQLite always runs"))
}

async fn post(service: &Service, ids: &[i64]) -> anyhow::Result<()> {
    let status = http()
        .post(service.url("/callback"))
        .json(&json!({ "object_ids": ids }))
        .send()
        .await?
        .status();
    anyhow::ensure!(status == 202, "callback answered {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_stored_from_an_https_upstream_with_a_private_ca() -> anyhow::Result<()> {
    // The binaries are built (once per test process) before the clock starts.
    tests::bins();
    bounded(TEST_DEADLINE, async {
        let dir = tempfile::tempdir()?;
        let pki = TestPki::new(dir.path(), "upstream");
        let upstream = HttpsUpstream::start(&pki.server("upstream", &["localhost"])).await?;
        let service = service(&upstream, pki.ca_file()).await?;
        post(&service, &[2, 4]).await?;
        for id in [2, 4] {
            eventually(WAIT, Duration::from_millis(50), || async {
                let status = http()
                    .get(service.url(&format!("/objects/{id}")))
                    .send()
                    .await?
                    .status();
                Ok((status == 200).then_some(()))
            })
            .await?;
        }
        assert!(upstream.answered.load(Ordering::Relaxed) >= 2);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_fetches_with_code_tls_and_the_cause_and_loses_no_id() -> anyhow::Result<()>
{
    // The binaries are built (once per test process) before the clock starts.
    tests::bins();
    bounded(TEST_DEADLINE, async {
        let dir = tempfile::tempdir()?;
        let pki = TestPki::new(dir.path(), "upstream");
        let wrong = TestPki::new(dir.path(), "wrong");
        let upstream = HttpsUpstream::start(&pki.server("upstream", &["localhost"])).await?;
        let service = service(&upstream, wrong.ca_file()).await?;
        post(&service, &[6]).await?;
        let metrics_url = service.admin_url("/metrics");
        eventually(WAIT, Duration::from_millis(100), || async {
            let text = http().get(&metrics_url).send().await?.text().await?;
            Ok(text
                .lines()
                .any(|l| l.starts_with(r#"fetch_retries_scheduled_total{code="tls"}"#))
                .then_some(()))
        })
        .await?;
        let lines = service.process.lines();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("upstream TLS handshake failed")
                    && l.contains("invalid peer certificate: UnknownIssuer")),
            "the log names the cause:\n{}",
            lines.join("\n")
        );
        assert_eq!(upstream.answered.load(Ordering::Relaxed), 0);
        let failures: serde_json::Value = http()
            .get(service.admin_url("/failures"))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(
            failures["failures"].as_array().map(Vec::len),
            Some(0),
            "a refused certificate dead-letters nothing: {failures}"
        );
        Ok(())
    })
    .await
}
