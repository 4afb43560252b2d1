//! Connection handling: timeouts, the connection cap and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use domain::testing::MemoryStore;
use domain::{BoxFuture, ObjectId, ObjectStore, StoreError, StoredObject, Timestamp};
use http::{Method, StatusCode};
use http_transport::HttpConfig;
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};

use crate::support::{
    Options, TestServer, raw_send, read_response, read_until_closed, request, send, within,
};

fn quick_header_timeout() -> Options {
    Options {
        http: HttpConfig {
            header_read_timeout: Duration::from_millis(200),
            ..HttpConfig::default()
        },
        ..Options::default()
    }
}

#[tokio::test]
async fn a_client_that_sends_half_a_request_line_is_disconnected() {
    let server = TestServer::start_with(quick_header_timeout()).await;
    let mut stream = raw_send(server.addr, b"GET /obj").await;
    let seen = read_until_closed(&mut stream).await;
    assert!(
        seen.is_empty() || seen.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_sends_nothing_or_part_of_the_http2_preface_is_disconnected() {
    let server = TestServer::start_with(quick_header_timeout()).await;
    let mut silent = raw_send(server.addr, b"").await;
    let mut partial_preface = raw_send(server.addr, b"PRI * HTTP/2.0\r\n").await;
    assert!(read_until_closed(&mut silent).await.is_empty());
    assert!(read_until_closed(&mut partial_preface).await.is_empty());

    // A client that does send a request in time is served as usual.
    let mut prompt = raw_send(server.addr, b"GET /objects HTTP/1.1\r\nhost: test\r\n\r\n").await;
    assert_eq!(read_response(&mut prompt).await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn accepting_waits_while_the_connection_cap_is_reached() {
    let server = TestServer::start_with(Options {
        http: HttpConfig {
            max_connections: 1,
            ..HttpConfig::default()
        },
        ..Options::default()
    })
    .await;
    // The hog is served once, then keeps its keep-alive connection, the only slot.
    let mut hog = raw_send(server.addr, b"GET /objects HTTP/1.1\r\nhost: test\r\n\r\n").await;
    assert_eq!(read_response(&mut hog).await.status, 200);

    let client = server.client.clone();
    let addr = server.addr;
    let mut waiting = tokio::spawn(async move {
        send(&client, addr, request(Method::GET, "/objects", None, "")).await
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting)
            .await
            .is_err(),
        "a second connection was served while the cap was reached"
    );

    drop(hog);
    let reply = within("the waiting request", waiting).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    server.stop().await;
}

/// A store whose reads announce themselves and then wait to be released.
struct GatedStore {
    inner: Arc<MemoryStore>,
    entered: mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
}

impl ObjectStore for GatedStore {
    fn upsert_seen<'a>(
        &'a self,
        batch: &'a [StoredObject],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.upsert_seen(batch)
    }

    fn delete_expired(
        &self,
        cutoff: Timestamp,
        limit: usize,
    ) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.inner.delete_expired(cutoff, limit)
    }

    fn next_expiry(&self) -> BoxFuture<'_, Result<Option<Timestamp>, StoreError>> {
        self.inner.next_expiry()
    }

    fn get(
        &self,
        id: ObjectId,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Option<StoredObject>, StoreError>> {
        Box::pin(async move {
            let _ = self.entered.send(());
            self.release.notified().await;
            self.inner.get(id, now).await
        })
    }

    fn list(
        &self,
        now: Timestamp,
        after: Option<ObjectId>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredObject>, StoreError>> {
        self.inner.list(now, after, limit)
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.ping()
    }
}

/// A server whose `GET /objects/{id}` blocks in the store until released.
async fn gated_server(grace: Duration) -> (TestServer, mpsc::UnboundedReceiver<()>, Arc<Notify>) {
    let (entered, entered_rx) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let gate = Arc::clone(&release);
    let server = TestServer::start_with(Options {
        http: HttpConfig {
            shutdown_grace: grace,
            ..HttpConfig::default()
        },
        wrap_store: Some(Box::new(move |inner| {
            Arc::new(GatedStore {
                inner,
                entered,
                release: gate,
            })
        })),
        ..Options::default()
    })
    .await;
    (server, entered_rx, release)
}

/// Waits until the listener refuses connections: shutdown has begun.
async fn wait_until_refused(server: &TestServer) {
    within("the listener closes", async {
        while TcpStream::connect(server.addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish() {
    let (server, mut entered, release) = gated_server(Duration::from_secs(10)).await;
    server.seed(4).await;
    let client = server.client.clone();
    let addr = server.addr;
    let in_flight = tokio::spawn(async move {
        send(&client, addr, request(Method::GET, "/objects/4", None, "")).await
    });
    within("the request reaches the store", entered.recv()).await;

    server.shutdown.cancel();
    wait_until_refused(&server).await;
    assert!(
        !server.has_stopped(),
        "serve waits for the request in flight"
    );

    release.notify_one();
    let reply = within("the answer", in_flight).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json["id"], 4);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    use tokio::io::AsyncWriteExt as _;

    let (server, mut entered, release) = gated_server(Duration::from_secs(10)).await;
    server.seed(4).await;
    let mut stream = raw_send(server.addr, b"GET /objects/4 HTTP/1.1\r\nhost: t\r\n\r\n").await;
    stream.shutdown().await.unwrap(); // the client has nothing more to send
    // The connection reads on while the handler runs: it sees the EOF before the answer.
    within("the request reaches the store", entered.recv()).await;
    release.notify_one();

    let seen = within("the answer", read_until_closed(&mut stream)).await;
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("\"id\":4"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_gives_up_on_requests_that_outlast_the_grace_period() {
    let (server, mut entered, _release) = gated_server(Duration::from_millis(200)).await;
    let client = server.client.clone();
    let addr = server.addr;
    let stuck = tokio::spawn(async move {
        let req = request(Method::GET, "/objects/4", None, "");
        let uri = format!("http://{addr}/objects/4");
        let mut req = req;
        *req.uri_mut() = uri.parse().unwrap();
        client.request(req).await
    });
    within("the request reaches the store", entered.recv()).await;

    // Never released: serve must still return once the grace period is over.
    server.stop().await;
    let outcome = within("the stuck request ends", stuck).await.unwrap();
    assert!(outcome.is_err(), "the connection was closed: {outcome:?}");
}

#[tokio::test]
async fn callbacks_past_the_body_memory_budget_get_a_fast_503_and_memory_is_given_back() {
    let server = TestServer::start_with(Options {
        http: HttpConfig {
            max_body_memory_bytes: 8 * 1024,
            ..HttpConfig::default()
        },
        ..Options::default()
    })
    .await;
    // A client that declares 6 000 bytes and sends them slowly holds 6 000 of the 8 192.
    let body = format!("{{\"object_ids\":[{}]}}", vec!["1"; 2_992].join(","));
    assert_eq!(body.len(), 6_000);
    let head = format!(
        "POST /callback HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut hog = raw_send(server.addr, head.as_bytes()).await;

    // Another callback (charged at least 4 KiB) does not fit: 503 with Retry-After, at
    // once. Until the hog's request has reached its handler, the other one may still fit.
    let refused = within("a callback refused for want of memory", async {
        loop {
            let reply = server.callback(r#"{"object_ids":[7]}"#).await;
            if reply.status == StatusCode::SERVICE_UNAVAILABLE {
                return reply;
            }
            assert_eq!(reply.status, StatusCode::ACCEPTED);
            tokio::task::yield_now().await;
        }
    })
    .await;
    refused.assert_error(503, "unavailable");
    assert!(refused.retry_after() >= 1);
    assert!(
        refused.message().contains("retry later"),
        "{}",
        refused.message()
    );

    // Once the hog's body arrives and it is answered, the memory is free again.
    tokio::io::AsyncWriteExt::write_all(&mut hog, body.as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut hog).await.status, 202);
    let reply = server.callback(r#"{"object_ids":[7]}"#).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    server.stop().await;
}
