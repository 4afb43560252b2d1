//! A real server on 127.0.0.1:0 over the domain's fakes, and clients to talk to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use domain::testing::{FakeSource, MemoryStore};
use domain::{
    Application, ExpiryWaker, ObjectId, ObjectStore, Pipeline, PipelineConfig, StoredObject,
    SystemClock, Timestamp,
};
use http::{HeaderMap, Method, Request, StatusCode, Version, header};
use http_body_util::{BodyExt as _, Full};
use http_transport::HttpConfig;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the test servers' `GET /metrics` renders.
pub const METRICS_TEXT: &str = "# TYPE test_metric_total counter\ntest_metric_total 1\n";

/// How long any single step of a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test with `what` when it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no outcome within {DEADLINE:?}"))
}

/// Builds the store the server uses around the memory store.
pub type WrapStore = Box<dyn FnOnce(Arc<MemoryStore>) -> Arc<dyn ObjectStore>>;

/// How a test server is set up.
pub struct Options {
    pub http: HttpConfig,
    pub pipeline: PipelineConfig,
    pub latency: Duration,
    /// Wraps the memory store, e.g. to hold requests at a gate.
    pub wrap_store: Option<WrapStore>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            http: HttpConfig::default(),
            pipeline: PipelineConfig::default(),
            latency: Duration::from_millis(5),
            wrap_store: None,
        }
    }
}

/// A running public server and admin server over one application.
pub struct TestServer {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub store: Arc<MemoryStore>,
    pub source: Arc<FakeSource>,
    pub shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    admin: JoinHandle<std::io::Result<()>>,
    pub client: Client<HttpConnector, Full<Bytes>>,
    _pipeline: Pipeline,
}

/// A response, its body read and parsed as JSON.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub json: Value,
}

impl Reply {
    /// The envelope's `error` code.
    pub fn code(&self) -> &str {
        self.json["error"].as_str().unwrap_or_default()
    }

    /// The envelope's `message`.
    pub fn message(&self) -> &str {
        self.json["message"].as_str().unwrap_or_default()
    }

    /// Asserts the status, the JSON content type and the envelope code; returns the message.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) -> &str {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        assert_eq!(self.code(), code, "{self:?}");
        assert_eq!(self.headers[header::CONTENT_TYPE], "application/json");
        let message = self.message();
        assert!(!message.is_empty(), "{self:?}");
        assert!(
            !message.starts_with(|c: char| c.is_ascii_uppercase()) && !message.ends_with('.'),
            "messages are lowercase without a trailing dot: {message:?}"
        );
        message
    }

    /// The `Retry-After` header in seconds.
    #[track_caller]
    pub fn retry_after(&self) -> u64 {
        self.headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric retry-after: {self:?}"))
    }
}

impl TestServer {
    /// A server with default limits.
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    /// A server set up as `options` says.
    pub async fn start_with(options: Options) -> Self {
        let memory = Arc::new(MemoryStore::new());
        let store: Arc<dyn ObjectStore> = match options.wrap_store {
            Some(wrap) => wrap(Arc::clone(&memory)),
            None => memory.clone(),
        };
        let source = Arc::new(FakeSource::new(options.latency));
        let clock = Arc::new(SystemClock);
        let pipeline = Pipeline::start(
            source.clone(),
            memory.clone(),
            clock.clone(),
            ExpiryWaker::new(),
            Arc::new(domain::NoTracePropagation),
            options.pipeline,
        );
        let app = Application::new(pipeline.handle(), store, clock);

        let shutdown = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(http_transport::serve(
            listener,
            app.clone(),
            options.http,
            shutdown.clone(),
        ));
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin_listener.local_addr().unwrap();
        let admin = tokio::spawn(http_transport::serve_admin(
            admin_listener,
            app,
            Arc::new(|| METRICS_TEXT.to_owned()),
            shutdown.clone(),
        ));
        Self {
            addr,
            admin_addr,
            store: memory,
            source,
            shutdown,
            server,
            admin,
            client: Client::builder(TokioExecutor::new()).build_http(),
            _pipeline: pipeline,
        }
    }

    /// Stores `id` as seen online now, expiring in a minute.
    pub async fn seed(&self, id: i64) -> StoredObject {
        let now = Timestamp::from_system_time(std::time::SystemTime::now());
        self.seed_at(id, now, now.saturating_add(Duration::from_secs(60)))
            .await
    }

    /// Stores `id` with the given times.
    pub async fn seed_at(
        &self,
        id: i64,
        last_seen: Timestamp,
        expires_at: Timestamp,
    ) -> StoredObject {
        let object = StoredObject {
            id: ObjectId::new(id).unwrap(),
            last_seen,
            expires_at,
        };
        self.store.upsert_seen(&[object]).await.unwrap();
        object
    }

    /// Sends `req` (its URI a path) to the public listener.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        send(&self.client, self.addr, req).await
    }

    /// `GET path` on the public listener.
    pub async fn get(&self, path: &str) -> Reply {
        self.send(request(Method::GET, path, None, "")).await
    }

    /// `GET path` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Reply {
        send(
            &self.client,
            self.admin_addr,
            request(Method::GET, path, None, ""),
        )
        .await
    }

    /// `method path` with a JSON `body` on the admin listener.
    pub async fn admin_send(&self, method: Method, path: &str, body: &str) -> Reply {
        let req = request(method, path, Some("application/json"), body);
        send(&self.client, self.admin_addr, req).await
    }

    /// `GET path` on the admin listener, for an answer that is not JSON: status, headers
    /// and the body as text.
    pub async fn admin_get_text(&self, path: &str) -> (StatusCode, HeaderMap, String) {
        let uri = format!("http://{}{path}", self.admin_addr);
        let req = Request::get(uri).body(Full::new(Bytes::new())).unwrap();
        let response = within(path, self.client.request(req)).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = within(path, body.collect()).await.unwrap().to_bytes();
        let text = String::from_utf8(bytes.to_vec()).expect("utf-8 body");
        (parts.status, parts.headers, text)
    }

    /// `POST /callback` with a JSON body.
    pub async fn callback(&self, body: &str) -> Reply {
        self.send(request(
            Method::POST,
            "/callback",
            Some("application/json"),
            body,
        ))
        .await
    }

    /// Whether `serve` has returned.
    pub fn has_stopped(&self) -> bool {
        self.server.is_finished()
    }

    /// Cancels the token and waits for both servers to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        within("serve returns", self.server).await.unwrap().unwrap();
        within("serve_admin returns", self.admin)
            .await
            .unwrap()
            .unwrap();
    }
}

/// A request for `path` with an optional content type.
pub fn request(
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(content_type) = content_type {
        builder = builder.header(header::CONTENT_TYPE, content_type);
    }
    builder
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap()
}

/// Sends `req` to `addr` with `client` and reads the JSON answer.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    mut req: Request<Full<Bytes>>,
) -> Reply {
    let uri = format!("http://{addr}{}", req.uri());
    *req.uri_mut() = uri.parse().unwrap();
    let what = format!("{} {}", req.method(), req.uri());
    let response = within(&what, client.request(req)).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = within(&what, body.collect()).await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|err| {
        panic!(
            "{what}: body is not json ({err}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        json,
    }
}

/// A response read off a raw TCP connection.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    /// The value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body is not json ({err}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads one HTTP/1.1 response (headers and a `Content-Length` body) from `stream`.
pub async fn read_response(stream: &mut TcpStream) -> RawReply {
    within("a raw response", async {
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "connection closed before a full response: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed in the middle of the body");
            body.extend_from_slice(&chunk[..n]);
        }
        RawReply {
            status,
            headers,
            body,
        }
    })
    .await
}

/// Connects to `addr` and writes `bytes`.
pub async fn raw_send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = within("connect", TcpStream::connect(addr)).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// Waits until the server closes `stream`; returns whatever it sent before.
pub async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    within("the server closes the connection", async {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => return seen,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
                // A reset is a close too.
                Err(_) => return seen,
            }
        }
    })
    .await
}
