//! A fake callback-service on 127.0.0.1: records every callback on a channel, answers
//! `202 {"accepted":N}`, "stores" the even ids at once and lists them on `GET /objects`.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

/// One callback the fake received.
#[derive(Debug, Clone)]
pub struct ReceivedCallback {
    /// The `content-type` header.
    pub content_type: Option<String>,
    /// The body as JSON.
    pub body: serde_json::Value,
    /// The body as sent.
    pub raw: Bytes,
    /// Every header.
    pub headers: hyper::HeaderMap,
}

#[derive(Debug, Default)]
struct State {
    stored: Mutex<BTreeSet<u64>>,
    post_delay: Mutex<Duration>,
    object_queries: Mutex<Vec<String>>,
    object_authorizations: Mutex<Vec<Option<String>>>,
}

/// The running fake; [`FakeService::stop`] ends it and every connection.
#[derive(Debug)]
pub struct FakeService {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl FakeService {
    /// Starts the fake; every callback it gets is sent on the returned channel.
    pub async fn start() -> (Self, mpsc::UnboundedReceiver<ReceivedCallback>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let (callbacks, received) = mpsc::unbounded_channel();
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                let mut connections = JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let (state, callbacks) = (state.clone(), callbacks.clone());
                            connections.spawn(async move {
                                let service = service_fn(move |request| {
                                    handle(request, state.clone(), callbacks.clone())
                                });
                                let _ = http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                        _ = &mut stopped => break,
                    }
                }
                connections.shutdown().await;
            }
        });
        let service = Self {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        };
        (service, received)
    }

    /// `http://127.0.0.1:port/callback`.
    pub fn callback_url(&self) -> String {
        format!("http://{}/callback", self.addr)
    }

    /// Makes every later callback answer only after `delay`.
    pub fn delay_posts(&self, delay: Duration) {
        *self.state.post_delay.lock().unwrap() = delay;
    }

    /// The query strings of every `GET /objects` so far.
    pub fn object_queries(&self) -> Vec<String> {
        self.state.object_queries.lock().unwrap().clone()
    }

    /// The `authorization` header of every `GET /objects` so far.
    pub fn object_authorizations(&self) -> Vec<Option<String>> {
        self.state.object_authorizations.lock().unwrap().clone()
    }

    /// Stops accepting, closes every connection and waits until all is gone.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for FakeService {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn handle(
    request: Request<Incoming>,
    state: Arc<State>,
    callbacks: mpsc::UnboundedSender<ReceivedCallback>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    match (request.method().clone(), request.uri().path()) {
        (Method::POST, "/callback") => {
            let content_type = request
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let headers = request.headers().clone();
            let bytes = request.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let ids: BTreeSet<u64> = body["object_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let _ = callbacks.send(ReceivedCallback {
                content_type,
                body,
                raw: bytes,
                headers,
            });
            let delay = *state.post_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            state
                .stored
                .lock()
                .unwrap()
                .extend(ids.iter().filter(|id| *id % 2 == 0));
            Ok(json(
                StatusCode::ACCEPTED,
                serde_json::json!({ "accepted": ids.len() }),
            ))
        }
        (Method::GET, "/objects") => {
            let query = request.uri().query().unwrap_or_default().to_owned();
            state.object_queries.lock().unwrap().push(query.clone());
            let authorization = request
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            state
                .object_authorizations
                .lock()
                .unwrap()
                .push(authorization);
            let param = |name: &str| {
                query
                    .split('&')
                    .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            let limit = param("limit").unwrap_or(100) as usize;
            let after = param("after");
            let objects: Vec<_> = state
                .stored
                .lock()
                .unwrap()
                .iter()
                .filter(|id| after.is_none_or(|after| **id > after))
                .take(limit)
                .map(|id| {
                    serde_json::json!({
                        "id": id,
                        "last_seen": "2026-01-01T00:00:00.000000Z",
                        "expires_at": "2026-01-01T00:00:30.000000Z",
                    })
                })
                .collect();
            Ok(json(
                StatusCode::OK,
                serde_json::json!({ "objects": objects }),
            ))
        }
        _ => Ok(json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "not_found", "message": "no such route" }),
        )),
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
