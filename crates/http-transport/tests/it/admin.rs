//! The admin listener: `/stats`, `/failures`, `/metrics`, the profiles, unknown routes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use domain::testing::{FakeSource, MemoryStore};
use domain::{
    Application, BoxFuture, ExpiryWaker, FetchError, Pipeline, PipelineConfig, SystemClock,
};
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use http_transport::{AdminServices, CpuProfileFormat, Profile, ProfileError, Profiler};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::{METRICS_TEXT, Reply, TestServer, request, send, within};

#[tokio::test]
async fn failures_and_stats_are_reported() {
    let server = TestServer::start().await;
    server.source.set_rule(|id| {
        if id.get() == 7 {
            Err(FetchError::Status(404)) // permanent: a dead letter at once
        } else {
            Ok(true)
        }
    });
    assert_eq!(
        server.callback(r#"{"object_ids":[7]}"#).await.status,
        StatusCode::ACCEPTED
    );

    let failures = within("the failure is recorded", async {
        loop {
            let reply = server.admin_get("/failures").await;
            assert_eq!(reply.status, StatusCode::OK);
            if !reply.json["failures"].as_array().unwrap().is_empty() {
                break reply.json;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let failure = &failures["failures"][0];
    assert_eq!(failure["id"], 7);
    assert_eq!(failure["code"], "status");
    assert!(failure["reason"].as_str().unwrap().contains("404"));
    assert_eq!(failure["attempts"], 1);
    assert!(failure["seq"].is_i64());
    assert_eq!(failures["next_after"], serde_json::Value::Null);
    let at = failure["at"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{at}");

    let stats = server.admin_get("/stats").await;
    assert_eq!(stats.status, StatusCode::OK);
    assert_eq!(stats.json["accepted_callbacks"], 1);
    assert_eq!(stats.json["failed"], 1);
    for counter in [
        "retries_scheduled",
        "retrying_ids",
        "oldest_retrying_ms",
        "accepted_ids",
        "fetches_started",
        "online",
        "offline",
        "stored",
        "store_batches",
        "pending_ids",
    ] {
        assert!(stats.json[counter].is_u64(), "{counter}: {stats:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_admin_listener_has_only_admin_routes() {
    let server = TestServer::start().await;
    server
        .admin_get("/nope")
        .await
        .assert_error(404, "not_found");
    server
        .admin_get("/objects")
        .await
        .assert_error(404, "not_found");
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_rendered_as_prometheus_text() {
    let server = TestServer::start().await;
    let (status, headers, text) = server.admin_get_text("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let content_type = headers[http::header::CONTENT_TYPE].to_str().unwrap();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert_eq!(text, METRICS_TEXT);
    server
        .admin_get("/metrics/x")
        .await
        .assert_error(404, "not_found");
    server.stop().await;
}

/// A profiler that answers as it is told and records what it was asked.
#[derive(Default)]
struct FakeProfiler {
    asked: Mutex<Vec<(Duration, CpuProfileFormat)>>,
    cpu_error: Mutex<Option<ProfileError>>,
    heap_error: Mutex<Option<ProfileError>>,
}

const FAKE_PPROF: &[u8] = b"\x1f\x8b fake pprof";
const FAKE_SVG: &[u8] = b"<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>";
const FAKE_HEAP: &[u8] = b"\x1f\x8b fake heap";

impl Profiler for FakeProfiler {
    fn cpu(
        &self,
        duration: Duration,
        format: CpuProfileFormat,
    ) -> BoxFuture<'static, Result<Profile, ProfileError>> {
        self.asked.lock().unwrap().push((duration, format));
        let answer = match self.cpu_error.lock().unwrap().clone() {
            Some(err) => Err(err),
            None => Ok(match format {
                CpuProfileFormat::Pprof => Profile {
                    content_type: "application/octet-stream",
                    body: FAKE_PPROF.to_vec(),
                },
                CpuProfileFormat::Flamegraph => Profile {
                    content_type: "image/svg+xml",
                    body: FAKE_SVG.to_vec(),
                },
            }),
        };
        Box::pin(async move { answer })
    }

    fn heap(&self) -> BoxFuture<'static, Result<Profile, ProfileError>> {
        let answer = match self.heap_error.lock().unwrap().clone() {
            Some(err) => Err(err),
            None => Ok(Profile {
                content_type: "application/octet-stream",
                body: FAKE_HEAP.to_vec(),
            }),
        };
        Box::pin(async move { answer })
    }
}

/// An admin listener with `profiler` plugged in, over the domain's fakes.
struct AdminServer {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
    _pipeline: Pipeline,
}

impl AdminServer {
    async fn start(profiler: Arc<FakeProfiler>) -> Self {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(SystemClock);
        let pipeline = Pipeline::start(
            Arc::new(FakeSource::new(Duration::from_millis(5))),
            store.clone(),
            clock.clone(),
            ExpiryWaker::new(),
            Arc::new(domain::NoTracePropagation),
            PipelineConfig::default(),
        );
        let app = Application::new(pipeline.handle(), store, clock);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let services =
            AdminServices::new(Arc::new(|| METRICS_TEXT.to_owned())).with_profiler(profiler);
        let task = tokio::spawn(http_transport::serve_admin(
            listener,
            app,
            services,
            shutdown.clone(),
        ));
        Self {
            addr,
            client: Client::builder(TokioExecutor::new()).build_http(),
            shutdown,
            task,
            _pipeline: pipeline,
        }
    }

    /// `GET path` answered with JSON (the error envelope).
    async fn get_json(&self, path: &str) -> Reply {
        self.json(Method::GET, path).await
    }

    /// `method path` answered with JSON (the error envelope).
    async fn json(&self, method: Method, path: &str) -> Reply {
        send(&self.client, self.addr, request(method, path, None, "")).await
    }

    /// `GET path`: status, headers and the raw body.
    async fn get(&self, path: &str) -> (StatusCode, HeaderMap, Bytes) {
        let uri = format!("http://{}{path}", self.addr);
        let req = Request::get(uri).body(Full::new(Bytes::new())).unwrap();
        let response = within(path, self.client.request(req)).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = within(path, body.collect()).await.unwrap().to_bytes();
        (parts.status, parts.headers, bytes)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        within("serve_admin returns", self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn profiles_pass_through_with_their_content_type() {
    let profiler = Arc::new(FakeProfiler::default());
    let server = AdminServer::start(profiler.clone()).await;

    let (status, headers, body) = server.get("/debug/pprof/profile").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/octet-stream");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(body, FAKE_PPROF);

    let (status, headers, body) = server
        .get("/debug/pprof/profile?seconds=2&format=flamegraph")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "image/svg+xml");
    assert_eq!(body, FAKE_SVG);

    let (status, headers, body) = server
        .get("/debug/pprof/profile?format=pprof&seconds=300")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/octet-stream");
    assert_eq!(body, FAKE_PPROF);

    assert_eq!(
        *profiler.asked.lock().unwrap(),
        [
            (Duration::from_secs(30), CpuProfileFormat::Pprof),
            (Duration::from_secs(2), CpuProfileFormat::Flamegraph),
            (Duration::from_secs(300), CpuProfileFormat::Pprof),
        ],
        "seconds default to 30 and format to pprof"
    );

    let (status, headers, body) = server.get("/debug/pprof/heap").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/octet-stream");
    assert_eq!(body, FAKE_HEAP);
    server.stop().await;
}

#[tokio::test]
async fn bad_seconds_or_format_are_refused_before_profiling() {
    let profiler = Arc::new(FakeProfiler::default());
    let server = AdminServer::start(profiler.clone()).await;
    for (query, parameter) in [
        ("seconds=0", "`seconds`"),
        ("seconds=301", "`seconds`"),
        ("seconds=-5", "`seconds`"),
        ("seconds=1.5", "`seconds`"),
        ("seconds=abc", "`seconds`"),
        ("seconds=", "`seconds`"),
        ("seconds=1&seconds=2", "`seconds`"),
        ("format=svg", "`format`"),
        ("format=", "`format`"),
        ("seconds=1&format=FLAMEGRAPH", "`format`"),
    ] {
        let reply = server
            .get_json(&format!("/debug/pprof/profile?{query}"))
            .await;
        let message = reply.assert_error(400, "invalid_query");
        assert!(message.contains(parameter), "{query}: {message}");
    }
    assert!(
        profiler.asked.lock().unwrap().is_empty(),
        "no profile was started"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_profile_in_progress_and_disabled_heap_profiling_are_conflicts() {
    let profiler = Arc::new(FakeProfiler::default());
    let server = AdminServer::start(profiler.clone()).await;

    *profiler.cpu_error.lock().unwrap() = Some(ProfileError::InProgress);
    let reply = server
        .get_json("/debug/pprof/profile?seconds=1&format=flamegraph")
        .await;
    let message = reply.assert_error(409, "profile_in_progress");
    assert!(message.contains("already"), "{message}");

    let disabled = "heap profiling is off: set telemetry.heap_profiling = true and restart";
    *profiler.heap_error.lock().unwrap() =
        Some(ProfileError::HeapProfilingDisabled(disabled.to_owned()));
    let reply = server.get_json("/debug/pprof/heap").await;
    assert_eq!(
        reply.assert_error(409, "heap_profiling_disabled"),
        disabled,
        "the profiler's message names the switch"
    );
    server.stop().await;
}

#[tokio::test]
async fn unsupported_and_failed_profiles_say_so_in_the_envelope() {
    let profiler = Arc::new(FakeProfiler::default());
    let server = AdminServer::start(profiler.clone()).await;

    *profiler.heap_error.lock().unwrap() = Some(ProfileError::NotSupported(
        "heap profiles are only supported on linux".to_owned(),
    ));
    let reply = server.get_json("/debug/pprof/heap").await;
    assert_eq!(
        reply.assert_error(501, "not_supported"),
        "heap profiles are only supported on linux"
    );

    *profiler.cpu_error.lock().unwrap() = Some(ProfileError::Failed(
        "timer_create: secret detail".to_owned(),
    ));
    let reply = server.get_json("/debug/pprof/profile?seconds=1").await;
    let message = reply.assert_error(500, "internal_error");
    assert!(
        !message.contains("secret"),
        "the cause stays in the log: {message}"
    );

    let reply = server.json(Method::POST, "/debug/pprof/profile").await;
    reply.assert_error(405, "method_not_allowed");
    server.stop().await;
}

#[tokio::test]
async fn without_a_profiler_the_profile_routes_are_not_supported() {
    // TestServer plugs in a bare metrics renderer.
    let server = TestServer::start().await;
    for path in ["/debug/pprof/profile?seconds=1", "/debug/pprof/heap"] {
        server
            .admin_get(path)
            .await
            .assert_error(501, "not_supported");
    }
    server
        .admin_get("/debug/pprof/profile?seconds=0")
        .await
        .assert_error(400, "invalid_query");
    server.stop().await;
}

/// Dead letters of ids `0..n`, each failed for good (404), recorded through the pipeline.
async fn dead_letters(server: &TestServer, n: i64) {
    server.source.set_rule(|_| Err(FetchError::Status(404)));
    let ids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let body = format!(r#"{{"object_ids":[{}]}}"#, ids.join(","));
    assert_eq!(server.callback(&body).await.status, StatusCode::ACCEPTED);
    within("every id is a dead letter", async {
        while server.store.dead_letter_count() < n as usize {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

fn listed_ids(reply: &serde_json::Value) -> Vec<i64> {
    let failures = reply["failures"].as_array().unwrap();
    failures.iter().map(|f| f["id"].as_i64().unwrap()).collect()
}

#[tokio::test]
async fn failures_are_paginated_and_filtered() {
    let server = TestServer::start().await;
    dead_letters(&server, 5).await;

    let mut seen = Vec::new();
    let mut path = "/failures?limit=2".to_owned();
    loop {
        let page = server.admin_get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        seen.extend(listed_ids(&page.json));
        match page.json["next_after"].as_i64() {
            Some(after) => path = format!("/failures?limit=2&after={after}"),
            None => break,
        }
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        [0, 1, 2, 3, 4],
        "every dead letter once, over the pages"
    );

    let some = server.admin_get("/failures?ids=1,3&code=status").await;
    let mut ids = listed_ids(&some.json);
    ids.sort_unstable();
    assert_eq!(ids, [1, 3]);
    let none = server.admin_get("/failures?code=timeout").await;
    assert_eq!(listed_ids(&none.json), Vec::<i64>::new());
    let future = server
        .admin_get("/failures?since=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(listed_ids(&future.json), Vec::<i64>::new());
    server
        .admin_get("/failures?since=tomorrow")
        .await
        .assert_error(400, "invalid_query");
    server
        .admin_get("/failures?limit=0")
        .await
        .assert_error(400, "invalid_query");
    server.stop().await;
}

#[tokio::test]
async fn replay_refetches_the_selected_dead_letters_and_purge_deletes_them() {
    let server = TestServer::start().await;
    dead_letters(&server, 4).await;
    server.source.set_rule(|id| Ok(id.get() % 2 == 0));

    server
        .admin_send(Method::POST, "/failures/replay", "{}")
        .await
        .assert_error(400, "invalid_json");
    server
        .admin_send(Method::POST, "/failures/replay", r#"{"ids":[-1]}"#)
        .await
        .assert_error(422, "invalid_object_id");
    let replayed = server
        .admin_send(Method::POST, "/failures/replay", r#"{"ids":[0,1]}"#)
        .await;
    assert_eq!(replayed.status, StatusCode::OK, "{replayed:?}");
    assert_eq!(replayed.json["replayed"], 2);
    let again = server
        .admin_send(Method::POST, "/failures/replay", r#"{"ids":[0,1]}"#)
        .await;
    assert_eq!(again.json["replayed"], 0, "idempotent");
    within("the replayed even id is stored", async {
        while server.get("/objects/0").await.status != StatusCode::OK {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let left = server.admin_get("/failures").await;
    let mut ids = listed_ids(&left.json);
    ids.sort_unstable();
    assert_eq!(ids, [2, 3]);

    let purged = server
        .admin_send(Method::DELETE, "/failures", r#"{"all":true}"#)
        .await;
    assert_eq!(purged.status, StatusCode::OK, "{purged:?}");
    assert_eq!(purged.json["purged"], 2);
    assert_eq!(
        listed_ids(&server.admin_get("/failures").await.json),
        Vec::<i64>::new()
    );
    assert_eq!(server.store.inbox_len(), 0, "purge enqueues nothing");
    server.stop().await;
}
