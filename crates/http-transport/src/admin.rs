//! The admin listener's routes: `GET /failures`, `GET /stats` and `GET /metrics`.
//!
//! New operator routes (metrics, profiles) are one `.route(..)` line in [`router`] and,
//! when they need more than the application, one more field in [`AdminState`].

use std::sync::Arc;

use bytes::Bytes;
use domain::Application;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;

use crate::MetricsRenderer;
use crate::json::{FailureJson, StatsJson, json_response};
use crate::router::{HandlerResult, PathParams, Router};

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What every admin handler gets.
pub(crate) struct AdminState {
    app: Application,
    metrics: MetricsRenderer,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    pub(crate) fn new(app: Application, metrics: MetricsRenderer) -> Self {
        Self { app, metrics }
    }
}

/// The routes of the admin listener; its requests are not counted in the HTTP series.
pub(crate) fn router() -> Router<Arc<AdminState>> {
    Router::new()
        .unmetered()
        .route(Method::GET, "/failures", failures)
        .route(Method::GET, "/stats", stats)
        .route(Method::GET, "/metrics", metrics)
}

#[derive(Debug, Serialize)]
struct FailuresJson {
    failures: Vec<FailureJson>,
}

/// How many failures `GET /failures` lists.
const FAILURES_LISTED: usize = 1_000;

/// The most recent ids whose processing failed, newest first, as the database keeps them.
async fn failures(state: Arc<AdminState>, _: Request<Incoming>, _: PathParams) -> HandlerResult {
    let failures = state
        .app
        .recent_failures(FAILURES_LISTED)
        .await?
        .into_iter()
        .map(FailureJson::from)
        .collect();
    json_response(StatusCode::OK, &FailuresJson { failures })
}

/// The pipeline's counters.
async fn stats(state: Arc<AdminState>, _: Request<Incoming>, _: PathParams) -> HandlerResult {
    let stats = state.app.stats();
    json_response(StatusCode::OK, &StatsJson::from(stats))
}

/// Every series in the Prometheus text exposition format.
async fn metrics(state: Arc<AdminState>, _: Request<Incoming>, _: PathParams) -> HandlerResult {
    let text = (state.metrics)();
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROMETHEUS_TEXT),
    );
    Ok(response)
}
