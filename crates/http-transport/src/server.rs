//! The server machinery both listeners share: a capped accept loop, HTTP/1.1 and HTTP/2
//! connections with timeouts, optional TLS, and a bounded graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::HttpConfig;
use crate::router::Router;
use crate::tls_listener::{self, ListenerTls};

/// How long the accept loop pauses after an accept error (out of file descriptors, …).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How long an HTTP/2 keep-alive ping may go unanswered before the connection is closed.
const HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest request head (request line and header fields) a connection buffers: past it
/// hyper answers `431` itself (HTTP/1.1) or refuses the stream (HTTP/2). Above the router's
/// [`crate::router::MAX_HEADER_BYTES`], so a request between the two gets the envelope.
/// hyper's default is about 400 KiB per connection.
pub(crate) const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;

/// The connection-level limits of one listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) header_read_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) shutdown_grace: Duration,
    pub(crate) http2_keep_alive_interval: Option<Duration>,
}

impl From<&HttpConfig> for Settings {
    fn from(config: &HttpConfig) -> Self {
        Self {
            header_read_timeout: config.header_read_timeout,
            max_connections: config.max_connections,
            shutdown_grace: config.shutdown_grace,
            http2_keep_alive_interval: config.http2_keep_alive_interval,
        }
    }
}

/// The HTTP/1 and HTTP/2 settings of every connection of a listener.
pub(crate) fn connection_builder(settings: &Settings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD_BYTES)
        .keep_alive(true)
        // A client may send its request and then shut its sending half (`shutdown(SHUT_WR)`,
        // `curl` piping a body, load balancers draining): it still gets its answer. Without
        // this, hyper treats the EOF as the client gone and drops the request unanswered.
        // A half-closed connection stays bounded: no further request can arrive on it, and
        // the connection closes once the answer is written.
        .half_close(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.http2_keep_alive_interval)
        .keep_alive_timeout(HTTP2_KEEP_ALIVE_TIMEOUT)
        .max_header_list_size(MAX_REQUEST_HEAD_BYTES as u32);
    builder
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then drains connections
/// for at most `settings.shutdown_grace`.
///
/// With `tls`, every connection starts with a TLS handshake (bounded by the header read
/// timeout, in the connection's own task so a slow client holds up nobody), and the
/// certificate is kept fresh beside the accept loop.
pub(crate) async fn run<S>(
    name: &'static str,
    listener: TcpListener,
    router: Router<S>,
    state: S,
    settings: Settings,
    tls: Option<ListenerTls>,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    S: Clone + Send + Sync + 'static,
{
    let local = listener.local_addr()?;
    tracing::debug!(listener = name, %local, tls = tls.is_some(), "listening");
    let router = Arc::new(router);
    let builder = Arc::new(connection_builder(&settings));
    let acceptor = tls.as_ref().map(|tls| tls.acceptor().clone());
    let reloader =
        tls.map(|tls| tokio::spawn(tls_listener::keep_fresh(name, tls, shutdown.clone())));
    let limit = settings.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(limit));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut at_limit = false;

    'accept: loop {
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => {
                at_limit = false;
                permit
            }
            Err(_) => {
                if !at_limit {
                    tracing::warn!(
                        listener = name,
                        limit,
                        "connection limit reached; new connections wait until one closes"
                    );
                    at_limit = true;
                }
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break 'accept,
                    permit = Arc::clone(&permits).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_closed) => break 'accept,
                    },
                }
            }
        };

        let (stream, peer) = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break 'accept,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => break accepted,
                    Err(err) if is_per_connection(&err) => {
                        tracing::debug!(listener = name, error = %err, "a connection failed while being accepted");
                    }
                    Err(err) => {
                        tracing::warn!(listener = name, error = %err, "accept failed; retrying shortly");
                        tokio::select! {
                            biased;
                            () = shutdown.cancelled() => break 'accept,
                            () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                        }
                    }
                },
            }
        };

        while let Some(done) = connections.try_join_next() {
            report_task(name, done);
        }

        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %err, "could not set TCP_NODELAY");
        }
        let first_request = Arc::new(Notify::new());
        let service = {
            let router = Arc::clone(&router);
            let state = state.clone();
            let first_request = Arc::clone(&first_request);
            service_fn(move |req| {
                first_request.notify_one();
                let router = Arc::clone(&router);
                let state = state.clone();
                async move { Ok::<_, Infallible>(router.dispatch(state, req).await) }
            })
        };
        let span = tracing::debug_span!("connection", listener = name, %peer);
        let watcher = graceful.watcher();
        let builder = Arc::clone(&builder);
        let acceptor = acceptor.clone();
        let timeout = settings.header_read_timeout;
        connections.spawn(
            async move {
                match acceptor {
                    None => {
                        let conn = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .into_owned();
                        drive_connection(watcher.watch(conn), first_request, timeout, permit).await;
                    }
                    Some(acceptor) => {
                        let Some(stream) =
                            tls_listener::handshake(name, &acceptor, stream, timeout).await
                        else {
                            return;
                        };
                        let conn = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .into_owned();
                        drive_connection(watcher.watch(conn), first_request, timeout, permit).await;
                    }
                }
            }
            .instrument(span),
        );
    }

    drop(listener);
    let open = limit - permits.available_permits();
    tracing::info!(
        listener = name,
        open,
        "stopped accepting; letting requests in flight finish"
    );
    match tokio::time::timeout(settings.shutdown_grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!(listener = name, "every connection drained"),
        Err(_elapsed) => {
            let left = limit - permits.available_permits();
            tracing::warn!(
                listener = name,
                left,
                grace = ?settings.shutdown_grace,
                "gave up waiting for connections; closing them"
            );
            connections.abort_all();
        }
    }
    while let Some(done) = connections.join_next().await {
        report_task(name, done);
    }
    if let Some(reloader) = reloader {
        report_task(name, reloader.await);
    }
    tracing::info!(listener = name, "server stopped");
    Ok(())
}

/// Drives one connection to its end, closing it early when no request arrives in time.
///
/// hyper's own header read timeout only starts once HTTP/1 was recognised; this one also
/// covers a client that sends nothing, or part of the HTTP/2 preface.
pub(crate) async fn drive_connection<F, E>(
    conn: F,
    first_request: Arc<Notify>,
    first_request_timeout: Duration,
    _permit: OwnedSemaphorePermit,
) where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let early = tokio::select! {
        biased;
        outcome = &mut conn => Some(outcome),
        () = first_request.notified() => None,
        () = tokio::time::sleep(first_request_timeout) => {
            tracing::debug!("no request within the header read timeout; closing the connection");
            return;
        }
    };
    let outcome = match early {
        Some(outcome) => outcome,
        None => conn.await,
    };
    match outcome {
        Ok(()) => tracing::debug!("connection closed"),
        Err(err) => tracing::debug!(error = %err, "connection closed with an error"),
    }
}

/// Whether an accept error concerns one connection only, so accepting can go on at once;
/// anything else (out of file descriptors or memory, …) gets a pause first.
fn is_per_connection(err: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        err.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    )
}

fn report_task(name: &'static str, done: Result<(), JoinError>) {
    if let Err(err) = done
        && err.is_panic()
    {
        tracing::error!(listener = name, error = %err, "a connection task panicked");
    }
}
