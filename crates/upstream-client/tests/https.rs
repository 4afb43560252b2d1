//! `HttpObjectSource` against an `https://` upstream on 127.0.0.1 with certificates made
//! by the test: a private CA is trusted when given, HTTP/2 is used when offered, and a
//! certificate that cannot be trusted fails the fetch with its cause.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use domain::{FetchError, ObjectId, ObjectSource, ObjectStatus};
use http_body_util::Full;
use hyper::{Request, Response};
use tls::testing::TestPki;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use upstream_client::{HttpObjectSource, UpstreamConfig, UpstreamError};

/// An https upstream answering `{"id":N,"online":true}` for `/objects/N`, recording the
/// HTTP version of each request; stopped when dropped.
struct HttpsUpstream {
    base_url: String,
    versions: Arc<Mutex<Vec<hyper::Version>>>,
    task: JoinHandle<()>,
}

impl Drop for HttpsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsUpstream {
    async fn start(identity: &tls::Identity) -> Self {
        let mut config = tls::server_config(identity).expect("server config");
        config.alpn_protocols = tls::http_alpn();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let versions = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&versions);
        let task = tokio::spawn(async move {
            // Bounded: a test makes a handful of connections.
            for _ in 0..64 {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    // A client that refuses our certificate ends the handshake here.
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        seen.lock().unwrap().push(req.version());
                        let id = req
                            .uri()
                            .path()
                            .rsplit('/')
                            .next()
                            .unwrap_or("0")
                            .to_owned();
                        async move {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                                r#"{{"id":{id},"online":true}}"#
                            )))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        Self {
            // The certificate names `localhost`, not the address.
            base_url: format!("https://localhost:{port}"),
            versions,
            task,
        }
    }
}

fn config(base_url: &str, ca: &std::path::Path) -> UpstreamConfig {
    UpstreamConfig {
        base_url: base_url.to_owned(),
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        retry_deadline: Duration::from_millis(300),
        retry_min_delay: Duration::from_millis(10),
        retry_max_delay: Duration::from_millis(50),
        tls_ca_file: Some(ca.to_owned()),
        ..UpstreamConfig::default()
    }
}

fn id(raw: i64) -> ObjectId {
    ObjectId::new(raw).unwrap()
}

#[tokio::test]
async fn an_https_upstream_with_a_private_ca_is_asked_over_http2() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path(), "upstream");
    let upstream = HttpsUpstream::start(&pki.server("upstream", &["localhost"])).await;
    let source = HttpObjectSource::new(config(&upstream.base_url, pki.ca_file())).unwrap();
    for raw in [4, 6] {
        assert_eq!(
            source.fetch(id(raw)).await,
            Ok(ObjectStatus {
                id: id(raw),
                online: true
            })
        );
    }
    assert_eq!(
        *upstream.versions.lock().unwrap(),
        [hyper::Version::HTTP_2, hyper::Version::HTTP_2],
        "ALPN chose HTTP/2"
    );
}

#[tokio::test]
async fn a_certificate_that_cannot_be_trusted_fails_the_fetch_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path(), "upstream");
    let other = TestPki::new(dir.path(), "other");
    let upstream = HttpsUpstream::start(&pki.server("upstream", &["localhost"])).await;
    let cases = [
        // Another CA than the one that signed the upstream's certificate.
        (config(&upstream.base_url, other.ca_file()), "UnknownIssuer"),
        // Mozilla's roots: a private CA is not among them.
        (
            UpstreamConfig {
                tls_ca_file: None,
                ..config(&upstream.base_url, other.ca_file())
            },
            "UnknownIssuer",
        ),
        // The right CA, but an address the certificate was not issued for.
        (
            config(
                &upstream.base_url.replace("localhost", "127.0.0.1"),
                pki.ca_file(),
            ),
            "not valid for name",
        ),
    ];
    for (config, cause) in cases {
        let source = HttpObjectSource::new(config).unwrap();
        let err = source.fetch(id(4)).await.unwrap_err();
        let FetchError::Tls(message) = &err else {
            panic!("expected a TLS failure, got {err:?}");
        };
        assert!(message.contains(cause), "{message}");
        assert_eq!(err.code(), "tls");
        assert!(
            err.is_transient(),
            "ids wait for the setting to be fixed, not dead-lettered"
        );
    }
    assert!(
        upstream.versions.lock().unwrap().is_empty(),
        "no request was sent over an untrusted connection"
    );
}

#[test]
fn tls_settings_that_cannot_work_are_refused_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-ca.pem");
    let err = HttpObjectSource::new(config("https://upstream.example", &missing)).unwrap_err();
    assert!(matches!(err, UpstreamError::Tls(_)), "{err:?}");
    assert!(err.to_string().contains("cannot read the CA file"), "{err}");
    assert!(err.to_string().contains("missing-ca.pem"), "{err}");

    let err = HttpObjectSource::new(config("http://127.0.0.1:9010", &missing)).unwrap_err();
    assert!(err.to_string().contains("the base url is http://"), "{err}");
}
