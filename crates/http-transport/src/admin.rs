//! The admin listener's routes: `GET /failures` and `GET /stats`.
//!
//! New operator routes (metrics, profiles) are one `.route(..)` line in [`router`] and,
//! when they need more than the application, one more field in [`AdminState`].

use std::sync::Arc;

use domain::Application;
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;

use crate::json::{FailureJson, StatsJson, json_response};
use crate::router::{HandlerResult, PathParams, Router};

/// What every admin handler gets.
#[derive(Debug)]
pub(crate) struct AdminState {
    app: Application,
}

impl AdminState {
    pub(crate) fn new(app: Application) -> Self {
        Self { app }
    }
}

/// The routes of the admin listener.
pub(crate) fn router() -> Router<Arc<AdminState>> {
    Router::new()
        .route(Method::GET, "/failures", failures)
        .route(Method::GET, "/stats", stats)
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
