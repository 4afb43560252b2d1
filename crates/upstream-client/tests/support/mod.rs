//! A scripted fake upstream: a hand-rolled HTTP/1.1 server on 127.0.0.1 that records the
//! requests it gets and answers each as the test told it to.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// How the fake answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// An HTTP answer, sent after `delay`.
    Answer {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
        delay: Duration,
        /// Send no `Content-Length`: the body ends when the connection closes.
        until_close: bool,
    },
    /// Read the request, then close the connection without answering.
    Close,
}

impl Reply {
    /// A 200 with `body`.
    pub fn ok(body: impl Into<String>) -> Self {
        Self::status(200, body)
    }

    /// An answer with `status` and `body`.
    pub fn status(status: u16, body: impl Into<String>) -> Self {
        Self::Answer {
            status,
            headers: Vec::new(),
            body: body.into(),
            delay: Duration::ZERO,
            until_close: false,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        if let Self::Answer { headers, .. } = &mut self {
            headers.push((name, value.into()));
        }
        self
    }

    /// Answers only after `wait`.
    pub fn delayed(mut self, wait: Duration) -> Self {
        if let Self::Answer { delay, .. } = &mut self {
            *delay = wait;
        }
        self
    }

    /// Frames the body by closing the connection instead of a `Content-Length`.
    pub fn until_close(mut self) -> Self {
        if let Self::Answer { until_close, .. } = &mut self {
            *until_close = true;
        }
        self
    }
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which accepted connection it came on, from 0.
    pub connection: usize,
    /// The request method.
    pub method: String,
    /// The request target, e.g. `/objects/4`.
    pub path: String,
    /// When the request head had been read.
    pub at: Instant,
}

#[derive(Debug, Default)]
struct State {
    script: Mutex<VecDeque<Reply>>,
    fallback: Mutex<Option<Reply>>,
    received: Mutex<Vec<Received>>,
    connections: AtomicUsize,
}

/// The running fake; [`FakeUpstream::stop`] ends it and every connection.
#[derive(Debug)]
pub struct FakeUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl FakeUpstream {
    /// Starts a fake that plays `script` in order, one reply per request; once the script
    /// is used up it answers `{"id":N,"online":N%2==0}` for `/objects/N`.
    pub async fn start(script: impl IntoIterator<Item = Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            script: Mutex::new(script.into_iter().collect()),
            ..State::default()
        });
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                let mut connections = JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let n = state.connections.fetch_add(1, Ordering::SeqCst);
                            connections.spawn(serve_connection(stream, n, state.clone()));
                        }
                        _ = &mut stopped => break,
                    }
                }
                // Dropping the set aborts every connection task, delayed answers included.
                connections.shutdown().await;
            }
        });
        Self {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Makes every request past the script get `reply`.
    pub fn answer_all_with(&self, reply: Reply) {
        *self.state.fallback.lock().unwrap() = Some(reply);
    }

    /// `http://127.0.0.1:port`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// How many TCP connections were accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
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

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        // A test that panicked before `stop` still leaves no server behind.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A port nothing listens on: bound, then released.
pub async fn refused_base_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

async fn serve_connection(mut stream: TcpStream, connection: usize, state: Arc<State>) {
    let mut buffer = Vec::with_capacity(1024);
    loop {
        let Some(head) = read_head(&mut stream, &mut buffer).await else {
            return;
        };
        let mut parts = head.lines().next().unwrap_or_default().split(' ');
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        state.received.lock().unwrap().push(Received {
            connection,
            method,
            path: path.clone(),
            at: Instant::now(),
        });
        let scripted = state.script.lock().unwrap().pop_front();
        let reply = scripted
            .or_else(|| state.fallback.lock().unwrap().clone())
            .unwrap_or_else(|| echo(&path));
        match reply {
            Reply::Close => return,
            Reply::Answer {
                status,
                headers,
                body,
                delay,
                until_close,
            } => {
                tokio::time::sleep(delay).await;
                let mut response = format!("HTTP/1.1 {status} Scripted\r\n");
                response.push_str("content-type: application/json\r\n");
                for (name, value) in headers {
                    response.push_str(&format!("{name}: {value}\r\n"));
                }
                if until_close {
                    response.push_str("connection: close\r\n");
                } else {
                    response.push_str(&format!("content-length: {}\r\n", body.len()));
                }
                response.push_str("\r\n");
                response.push_str(&body);
                if stream.write_all(response.as_bytes()).await.is_err() || until_close {
                    return;
                }
            }
        }
    }
}

/// What an honest upstream says about the id at the end of `path`.
fn echo(path: &str) -> Reply {
    match path
        .strip_prefix("/objects/")
        .and_then(|id| id.parse::<i64>().ok())
    {
        Some(id) => Reply::ok(format!(r#"{{"id":{id},"online":{}}}"#, id % 2 == 0)),
        None => Reply::status(404, r#"{"error":"not_found"}"#),
    }
}

/// Reads one request head (these requests have no body); `None` once the peer is gone.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            buffer.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
        if buffer.len() > 64 * 1024 {
            return None;
        }
    }
}
