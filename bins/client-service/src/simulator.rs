//! The upstream simulator: `GET /objects/{id}` answers `{"id":N,"online":N%2==0}` after a
//! random latency, like the upstream API callback-service asks.
//!
//! Each request runs in a span that continues the caller's trace (W3C `traceparent`) when
//! span export is on (`telemetry.zipkin_endpoint`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::SimulatorSettings;

/// The most connections served at once; further clients wait to be accepted.
pub const MAX_CONNECTIONS: usize = 10_000;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to pause accepting after an accept error (e.g. out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves the simulator on `listener` until `shutdown` is cancelled, then drains.
///
/// Requests in flight get up to their longest latency plus one second to finish; the
/// connections still open after that are closed.
pub async fn serve(
    listener: TcpListener,
    settings: SimulatorSettings,
    shutdown: CancellationToken,
) {
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "upstream simulator listening on {addr}"),
        Err(err) => {
            tracing::warn!(error = %err, "upstream simulator listening on an unknown address")
        }
    }
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    let latency = (settings.min_latency, settings.max_latency);

    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // the semaphore is never closed
            },
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "upstream simulator: accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            },
            () = shutdown.cancelled() => break,
        };
        let connection = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |request: Request<Incoming>| {
                let span = tracing::info_span!(
                    "request",
                    otel.name = "GET /objects/{id}",
                    otel.kind = "server",
                    method = %request.method(),
                    path = %request.uri().path(),
                );
                // Continues callback-service's trace when the request carries one.
                telemetry::propagation::set_parent(&span, request.headers());
                handle(request, latency).instrument(span)
            }),
        );
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%peer, error = %err, "upstream simulator: connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);

    let grace = settings.max_latency + Duration::from_secs(1);
    let open = graceful.count();
    tracing::info!(open_connections = open, grace = ?grace, "upstream simulator stopping: draining requests in flight");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("upstream simulator stopped"),
        () = tokio::time::sleep(grace) => {
            while connections.try_join_next().is_some() {}
            tracing::warn!(
                open_connections = connections.len(),
                "upstream simulator stopped: connections still open after the grace period were closed"
            );
        }
    }
    connections.shutdown().await;
}

/// Answers one request.
async fn handle(
    request: Request<Incoming>,
    latency: (Duration, Duration),
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    let Some(raw_id) = path
        .strip_prefix("/objects/")
        .filter(|rest| !rest.contains('/'))
    else {
        return Ok(error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for {path}; try GET /objects/{{id}}"),
        ));
    };
    if request.method() != Method::GET {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} is not allowed here; use GET", request.method()),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return Ok(response);
    }
    let id = match parse_id(raw_id) {
        Ok(id) => id,
        Err(message) => {
            return Ok(error(StatusCode::BAD_REQUEST, "invalid_object_id", message));
        }
    };
    tokio::time::sleep(pick_latency(latency.0, latency.1)).await;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "id": id, "online": id % 2 == 0 }),
    ))
}

/// Parses an object id: plain decimal digits that fit in `i64`.
fn parse_id(raw: &str) -> Result<i64, String> {
    let shown: String = raw.chars().take(32).collect();
    if raw.starts_with('-') && raw.len() > 1 && raw[1..].bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("object id must not be negative, got {shown}"));
    }
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "object id must be a non-negative decimal integer, got {shown:?}"
        ));
    }
    raw.parse::<i64>()
        .map_err(|_| format!("object id must be at most {}, got {shown}", i64::MAX))
}

/// A uniformly random latency in `[min, max]`, at microsecond resolution.
pub fn pick_latency(min: Duration, max: Duration) -> Duration {
    let min_us = u64::try_from(min.as_micros()).unwrap_or(u64::MAX);
    let max_us = u64::try_from(max.as_micros())
        .unwrap_or(u64::MAX)
        .max(min_us);
    Duration::from_micros(fastrand::u64(min_us..=max_us))
}

fn error(status: StatusCode, code: &str, message: String) -> Response<Full<Bytes>> {
    json(
        status,
        &serde_json::json!({ "error": code, "message": message }),
    )
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_non_negative_decimal_integers() {
        assert_eq!(parse_id("0"), Ok(0));
        assert_eq!(parse_id("42"), Ok(42));
        assert_eq!(parse_id("007"), Ok(7));
        assert_eq!(parse_id("9223372036854775807"), Ok(i64::MAX));
        assert!(parse_id("-1").unwrap_err().contains("negative"));
        assert!(
            parse_id("9223372036854775808")
                .unwrap_err()
                .contains("at most")
        );
        for bad in ["", "abc", "+1", "1.5", "1e3", " 1", "-", "١"] {
            let err = parse_id(bad).unwrap_err();
            assert!(err.contains("decimal integer"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn latency_stays_within_its_bounds() {
        let (min, max) = (Duration::from_millis(300), Duration::from_millis(4000));
        let samples: Vec<_> = (0..10_000).map(|_| pick_latency(min, max)).collect();
        assert!(samples.iter().all(|d| (min..=max).contains(d)));
        // Uniform, not stuck at one end.
        assert!(samples.iter().any(|d| *d < Duration::from_millis(1000)));
        assert!(samples.iter().any(|d| *d > Duration::from_millis(3300)));
        let fixed = Duration::from_millis(5);
        assert_eq!(pick_latency(fixed, fixed), fixed);
        assert_eq!(pick_latency(Duration::ZERO, Duration::ZERO), Duration::ZERO);
    }
}
