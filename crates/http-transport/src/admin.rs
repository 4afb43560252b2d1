//! The admin listener's routes: the dead letters (`GET /failures`, `POST
//! /failures/replay`, `DELETE /failures`, in [`crate::failures`]), `GET /stats`,
//! `GET /metrics`, and the profiles `GET /debug/pprof/profile` (CPU) and
//! `GET /debug/pprof/heap`.
//!
//! New operator routes (metrics, profiles) are one `.route(..)` line in [`router`] and,
//! when they need more than the application, one more field in [`AdminState`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use domain::{Application, BoxFuture};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::AdminServices;
use crate::error::ApiError;
use crate::failures;
use crate::json::{StatsJson, json_response};
use crate::router::{HandlerResult, PathParams, Router, echo};

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What every admin handler gets.
pub(crate) struct AdminState {
    pub(crate) app: Application,
    services: AdminServices,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    pub(crate) fn new(app: Application, services: AdminServices) -> Self {
        Self { app, services }
    }

    /// The profiler, or `501 not_supported` when the binary plugged none in.
    fn profiler(&self) -> Result<&dyn Profiler, ApiError> {
        self.services
            .profiler
            .as_deref()
            .ok_or_else(|| ApiError::NotSupported("this server takes no profiles".to_owned()))
    }
}

/// The routes of the admin listener; its requests are not counted in the HTTP series.
pub(crate) fn router() -> Router<Arc<AdminState>> {
    Router::new()
        .unmetered()
        .route(Method::GET, "/failures", failures::list)
        .route(Method::DELETE, "/failures", failures::purge)
        .route(Method::POST, "/failures/replay", failures::replay)
        .route(Method::GET, "/stats", stats)
        .route(Method::GET, "/metrics", metrics)
        .route(Method::GET, "/debug/pprof/profile", cpu_profile)
        .route(Method::GET, "/debug/pprof/heap", heap_profile)
}

/// The pipeline's counters.
async fn stats(state: Arc<AdminState>, _: Request<Incoming>, _: PathParams) -> HandlerResult {
    let stats = state.app.stats();
    json_response(StatusCode::OK, &StatsJson::from(stats))
}

/// Every series in the Prometheus text exposition format.
async fn metrics(state: Arc<AdminState>, _: Request<Incoming>, _: PathParams) -> HandlerResult {
    let text = (state.services.metrics)();
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROMETHEUS_TEXT),
    );
    Ok(response)
}

/// How `GET /debug/pprof/profile` returns the CPU profile: its `format` query parameter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CpuProfileFormat {
    /// `pprof` (the default): pprof's protobuf, for `go tool pprof` and friends.
    #[default]
    Pprof,
    /// `flamegraph`: an SVG flamegraph, for a browser.
    Flamegraph,
}

/// A profile as the admin listener sends it; the profiler chooses the content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The `Content-Type` of the answer, e.g. `application/octet-stream` for a gzipped
    /// pprof protobuf or `image/svg+xml` for a flamegraph.
    pub content_type: &'static str,
    /// The profile.
    pub body: Vec<u8>,
}

/// Why a [`Profiler`] gave no profile; each case has its status and envelope code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// Another CPU profile is being taken (`409 profile_in_progress`).
    #[error("a cpu profile is already being taken; try again when it is done")]
    InProgress,
    /// Heap profiling is switched off (`409 heap_profiling_disabled`); the message says
    /// how to switch it on.
    #[error("{0}")]
    HeapProfilingDisabled(String),
    /// This build or platform cannot take the profile (`501 not_supported`).
    #[error("{0}")]
    NotSupported(String),
    /// Taking the profile failed (`500 internal_error`; the cause is only logged).
    #[error("{0}")]
    Failed(String),
}

/// Takes the profiles of `GET /debug/pprof/profile` and `GET /debug/pprof/heap`.
///
/// The binary implements it over its profiler, so this crate depends on none.
pub trait Profiler: Send + Sync + 'static {
    /// Profiles the CPU for `duration`; the future is dropped if the client goes away,
    /// which should stop the profile.
    fn cpu(
        &self,
        duration: Duration,
        format: CpuProfileFormat,
    ) -> BoxFuture<'static, Result<Profile, ProfileError>>;

    /// Profiles the memory allocated now.
    fn heap(&self) -> BoxFuture<'static, Result<Profile, ProfileError>>;
}

/// `seconds` when the query does not say, as Go's `net/http/pprof`.
const DEFAULT_PROFILE_SECONDS: u64 = 30;

/// The longest CPU profile one request may ask for.
const MAX_PROFILE_SECONDS: u64 = 300;

/// The query of `GET /debug/pprof/profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuProfileQuery {
    duration: Duration,
    format: CpuProfileFormat,
}

impl CpuProfileQuery {
    /// Reads `seconds` (1 to 300, default 30) and `format` (`pprof`, the default, or
    /// `flamegraph`); other parameters are ignored, repeated ones refused.
    fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut seconds = None;
        let mut format = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match name {
                "seconds" => &mut seconds,
                "format" => &mut format,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(ApiError::InvalidQuery(format!(
                    "query parameter `{name}` is given more than once"
                )));
            }
        }
        let seconds = match seconds {
            None => DEFAULT_PROFILE_SECONDS,
            Some(raw) => raw
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=MAX_PROFILE_SECONDS).contains(n))
                .ok_or_else(|| {
                    ApiError::InvalidQuery(format!(
                        "query parameter `seconds` must be an integer from 1 to {MAX_PROFILE_SECONDS}, got {:?}",
                        echo(raw)
                    ))
                })?,
        };
        let format = match format {
            None | Some("pprof") => CpuProfileFormat::Pprof,
            Some("flamegraph") => CpuProfileFormat::Flamegraph,
            Some(other) => {
                return Err(ApiError::InvalidQuery(format!(
                    "query parameter `format` must be `pprof` or `flamegraph`, got {:?}",
                    echo(other)
                )));
            }
        };
        Ok(Self {
            duration: Duration::from_secs(seconds),
            format,
        })
    }
}

/// The CPU profile of the next `?seconds=N` (default 30), as `?format=pprof` (default) or
/// `?format=flamegraph`; one at a time.
async fn cpu_profile(
    state: Arc<AdminState>,
    req: Request<Incoming>,
    _: PathParams,
) -> HandlerResult {
    let query = CpuProfileQuery::parse(req.uri().query())?;
    let profile = state.profiler()?.cpu(query.duration, query.format).await?;
    profile_response(profile)
}

/// The heap profile: what is allocated now, by allocation stack, as the allocator sampled it.
async fn heap_profile(
    state: Arc<AdminState>,
    _: Request<Incoming>,
    _: PathParams,
) -> HandlerResult {
    let profile = state.profiler()?.heap().await?;
    profile_response(profile)
}

/// `profile` with its content type; never cached.
fn profile_response(profile: Profile) -> HandlerResult {
    let content_type =
        HeaderValue::from_str(profile.content_type).map_err(|_| ApiError::Internal {
            cause: format!(
                "the profiler gave an invalid content type {:?}",
                profile.content_type
            ),
        })?;
    let mut response = Response::new(Full::new(Bytes::from(profile.body)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str) -> Result<(u64, CpuProfileFormat), String> {
        CpuProfileQuery::parse(Some(query))
            .map(|q| (q.duration.as_secs(), q.format))
            .map_err(|err| match err {
                ApiError::InvalidQuery(message) => message,
                other => panic!("{query}: not an invalid_query: {other:?}"),
            })
    }

    #[test]
    fn seconds_default_to_thirty_and_format_to_pprof() {
        assert_eq!(
            CpuProfileQuery::parse(None).unwrap(),
            CpuProfileQuery {
                duration: Duration::from_secs(30),
                format: CpuProfileFormat::Pprof
            }
        );
        assert_eq!(parse(""), Ok((30, CpuProfileFormat::Pprof)));
        assert_eq!(parse("debug=1&gc=1"), Ok((30, CpuProfileFormat::Pprof)));
    }

    #[test]
    fn seconds_from_one_to_three_hundred_and_both_formats_are_accepted() {
        assert_eq!(parse("seconds=1"), Ok((1, CpuProfileFormat::Pprof)));
        assert_eq!(
            parse("seconds=300&format=flamegraph"),
            Ok((300, CpuProfileFormat::Flamegraph))
        );
        assert_eq!(
            parse("format=pprof&seconds=5"),
            Ok((5, CpuProfileFormat::Pprof))
        );
    }

    #[test]
    fn other_seconds_are_refused_naming_the_parameter() {
        for bad in [
            "seconds=0",
            "seconds=301",
            "seconds=-1",
            "seconds=1.5",
            "seconds=ten",
            "seconds=",
            "seconds",
            "seconds=99999999999999999999999",
        ] {
            let message = parse(bad).unwrap_err();
            assert!(
                message.starts_with("query parameter `seconds` must be an integer from 1 to 300"),
                "{bad}: {message}"
            );
        }
    }

    #[test]
    fn other_formats_and_repeated_parameters_are_refused() {
        for bad in [
            "format=svg",
            "format=",
            "format=PPROF",
            "format=flamegraph%20",
        ] {
            let message = parse(bad).unwrap_err();
            assert!(
                message.starts_with("query parameter `format` must be `pprof` or `flamegraph`"),
                "{bad}: {message}"
            );
        }
        let message = parse("seconds=1&seconds=2").unwrap_err();
        assert_eq!(message, "query parameter `seconds` is given more than once");
    }
}
