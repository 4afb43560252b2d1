//! The upstream simulator, over HTTP on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use client_service::config::SimulatorSettings;
use client_service::simulator;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(10);

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    client: reqwest::Client,
}

impl Running {
    async fn start(min_ms: u64, max_ms: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let settings = SimulatorSettings {
            listen: addr,
            min_latency: Duration::from_millis(min_ms),
            max_latency: Duration::from_millis(max_ms),
        };
        let task = tokio::spawn(simulator::serve(listener, settings, shutdown.clone()));
        Self {
            addr,
            shutdown,
            task,
            client: {
                tls::install_default_provider();
                reqwest::Client::new()
            },
        }
    }

    async fn request(&self, method: reqwest::Method, path: &str) -> (u16, Option<String>, Value) {
        let response = self
            .client
            .request(method, format!("http://{}{path}", self.addr))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.json().await.unwrap();
        (status, content_type, body)
    }

    async fn get(&self, path: &str) -> (u16, Option<String>, Value) {
        self.request(reqwest::Method::GET, path).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        timeout(PATIENCE, self.task)
            .await
            .expect("the simulator stops")
            .unwrap();
    }
}

#[tokio::test]
async fn even_ids_are_online_and_odd_ids_offline() {
    let simulator = Running::start(0, 5).await;
    for (id, online) in [
        (0, true),
        (4, true),
        (7, false),
        (99, false),
        (i64::MAX, false),
    ] {
        let (status, content_type, body) = simulator.get(&format!("/objects/{id}")).await;
        assert_eq!(status, 200);
        assert_eq!(content_type.as_deref(), Some("application/json"));
        assert_eq!(body, json!({ "id": id, "online": online }));
    }
    simulator.stop().await;
}

#[tokio::test]
async fn a_bad_id_gets_the_error_envelope() {
    let simulator = Running::start(0, 5).await;
    for path in [
        "/objects/abc",
        "/objects/-3",
        "/objects/1.5",
        "/objects/",
        "/objects/99999999999999999999",
    ] {
        let (status, content_type, body) = simulator.get(path).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(content_type.as_deref(), Some("application/json"));
        assert_eq!(body["error"], "invalid_object_id", "{path}: {body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("object id")),
            "{path}: {body}"
        );
    }
    simulator.stop().await;
}

#[tokio::test]
async fn other_paths_and_methods_are_refused() {
    let simulator = Running::start(0, 5).await;
    for path in ["/", "/objects", "/objects/1/extra", "/other/1"] {
        let (status, _, body) = simulator.get(path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"], "not_found", "{path}");
        assert!(body["message"].is_string());
    }
    let (status, _, body) = simulator.request(reqwest::Method::POST, "/objects/1").await;
    assert_eq!(status, 405);
    assert_eq!(body["error"], "method_not_allowed");
    simulator.stop().await;
}

#[tokio::test]
async fn answers_take_at_least_the_minimum_latency() {
    let simulator = Running::start(40, 40).await;
    let started = Instant::now();
    let (status, _, _) = simulator.get("/objects/2").await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(40),
        "{:?}",
        started.elapsed()
    );
    simulator.stop().await;
}

#[tokio::test]
async fn after_shutdown_the_port_is_closed() {
    let simulator = Running::start(0, 0).await;
    let addr = simulator.addr;
    assert_eq!(simulator.get("/objects/1").await.0, 200);
    simulator.stop().await;
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}
