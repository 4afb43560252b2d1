//! A small router: path patterns with `{param}` segments, per-method handlers, `404`/`405`
//! answers, one span per request, request metrics and a panic barrier around every handler.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use domain::BoxFuture;
use futures_util::FutureExt as _;
use http::{HeaderValue, Method, Request, Version, header};
use hyper::body::Incoming;
use tracing::Instrument as _;

use crate::error::ApiError;
use crate::json::Reply;
use crate::metrics;

/// The most header bytes a request may carry (names and values, plus `": "` and CRLF for
/// each field, as on the HTTP/1.1 wire): larger requests are answered `431` with the
/// envelope before routing. A cookie jar or a token fits many times over; a caller sending
/// more is broken or hostile. The connection's read buffer is capped at
/// [`crate::server::MAX_REQUEST_HEAD_BYTES`] above this, past which hyper itself answers
/// `431` (without a body: it has no request to hand us).
pub(crate) const MAX_HEADER_BYTES: usize = 32 * 1024;

/// The size [`MAX_HEADER_BYTES`] counts.
fn header_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// What a handler returns: a response, or an error [`ApiError::into_response`] will render.
pub(crate) type HandlerResult = Result<Reply, ApiError>;

type Handler<S> = Arc<
    dyn Fn(S, Request<Incoming>, PathParams) -> BoxFuture<'static, HandlerResult> + Send + Sync,
>;

/// The values of a route's `{param}` segments.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PathParams(Vec<(&'static str, String)>);

impl PathParams {
    /// The raw text of the segment named `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment {
    Literal(&'static str),
    Param(&'static str),
}

struct Route<S> {
    pattern: &'static str,
    segments: Vec<Segment>,
    methods: Vec<(Method, Handler<S>)>,
}

/// The routes of one listener over a shared state `S`, cloned into every handler call.
pub(crate) struct Router<S> {
    routes: Vec<Route<S>>,
    /// Whether requests are counted in the HTTP series.
    metered: bool,
    /// Whether a request's `traceparent` continues the caller's trace.
    trust_incoming_trace: bool,
}

impl<S> std::fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for route in &self.routes {
            for (method, _) in &route.methods {
                list.entry(&format_args!("{method} {}", route.pattern));
            }
        }
        list.finish()
    }
}

/// What a request resolves to.
enum Resolved<'r, S> {
    Found(&'r Handler<S>, PathParams, &'static str),
    MethodNotAllowed(String, &'static str),
    NotFound,
}

fn parse_pattern(pattern: &'static str) -> Vec<Segment> {
    split_path(pattern)
        .map(
            |seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => Segment::Param(name),
                None => Segment::Literal(seg),
            },
        )
        .collect()
}

/// The segments of an absolute path: `/` has none, `/a/b` has `a` and `b`.
fn split_path(path: &str) -> impl Iterator<Item = &str> {
    let rest = path.strip_prefix('/').unwrap_or(path);
    rest.split('/').filter(move |_| !rest.is_empty())
}

fn match_segments(segments: &[Segment], path: &str) -> Option<PathParams> {
    let mut params = PathParams::default();
    let mut parts = split_path(path);
    for segment in segments {
        let part = parts.next()?;
        match *segment {
            Segment::Literal(lit) if lit == part => {}
            Segment::Literal(_) => return None,
            Segment::Param(_) if part.is_empty() => return None,
            Segment::Param(name) => params.0.push((name, part.to_owned())),
        }
    }
    parts.next().is_none().then_some(params)
}

/// Request paths echoed in messages are cut to this many characters.
const ECHO_MAX: usize = 128;

impl<S: Clone + Send + Sync + 'static> Router<S> {
    /// A router without routes: every request gets `404`.
    pub(crate) fn new() -> Self {
        Self {
            routes: Vec::new(),
            metered: true,
            trust_incoming_trace: true,
        }
    }

    /// Whether a request's trace context (`traceparent`, B3) continues the caller's trace
    /// and so decides whether it is sampled (the default), or is ignored: every request
    /// then starts a trace of its own, sampled at the configured ratio.
    pub(crate) fn trusting_incoming_trace(mut self, trust: bool) -> Self {
        self.trust_incoming_trace = trust;
        self
    }

    /// Leaves this router's requests out of the HTTP series (the admin listener: scrapes
    /// and operator calls are not the traffic being measured).
    pub(crate) fn unmetered(mut self) -> Self {
        self.metered = false;
        self
    }

    /// Adds `handler` for `method` on `pattern` (`/objects/{id}`-style).
    pub(crate) fn route<F, Fut>(mut self, method: Method, pattern: &'static str, handler: F) -> Self
    where
        F: Fn(S, Request<Incoming>, PathParams) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler: Handler<S> = Arc::new(move |state, req, params| {
            Box::pin(handler(state, req, params)) as BoxFuture<'static, HandlerResult>
        });
        match self.routes.iter_mut().find(|r| r.pattern == pattern) {
            Some(route) => route.methods.push((method, handler)),
            None => self.routes.push(Route {
                pattern,
                segments: parse_pattern(pattern),
                methods: vec![(method, handler)],
            }),
        }
        self
    }

    fn resolve(&self, method: &Method, path: &str) -> Resolved<'_, S> {
        for route in &self.routes {
            let Some(params) = match_segments(&route.segments, path) else {
                continue;
            };
            return match route.methods.iter().find(|(m, _)| m == method) {
                Some((_, handler)) => Resolved::Found(handler, params, route.pattern),
                None => Resolved::MethodNotAllowed(
                    route
                        .methods
                        .iter()
                        .map(|(m, _)| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    route.pattern,
                ),
            };
        }
        Resolved::NotFound
    }

    /// Runs the handler `req` resolves to and renders its outcome; never fails.
    ///
    /// A panic in the handler is caught here and answered as `500 internal_error`; the
    /// connection and the server keep working.
    ///
    /// Every request runs in a `request` span named `{method} {route}` for trace export,
    /// with `method`, `path`, `route` and `status`; it continues the caller's trace when
    /// the request carries a `traceparent` and the router trusts it
    /// ([`Router::trusting_incoming_trace`]). The span is at `info` on metered routers (the
    /// traffic being traced) and at `debug` on the others (scrapes and operator calls).
    pub(crate) async fn dispatch(&self, state: S, req: Request<Incoming>) -> Reply {
        let resolved = self.resolve(req.method(), req.uri().path());
        let route = match &resolved {
            Resolved::Found(_, _, pattern) | Resolved::MethodNotAllowed(_, pattern) => *pattern,
            Resolved::NotFound => metrics::UNMATCHED,
        };
        let method = metrics::method_label(req.method());
        // The exported span's name is fixed when the span is created: the route is known
        // by then.
        let name = tracing::field::display(SpanName { method, route });
        let span = if self.metered {
            tracing::info_span!(
                "request",
                otel.name = name,
                otel.kind = "server",
                method = %req.method(),
                path = %req.uri().path(),
                route,
                status = tracing::field::Empty,
            )
        } else {
            tracing::debug_span!(
                "request",
                otel.name = name,
                otel.kind = "server",
                method = %req.method(),
                path = %req.uri().path(),
                route,
                status = tracing::field::Empty,
            )
        };
        if self.trust_incoming_trace {
            trace_context::set_parent(&span, req.headers());
        }
        self.dispatch_in_span(state, req, resolved, method, route)
            .instrument(span)
            .await
    }

    /// [`Router::dispatch`] inside its span.
    async fn dispatch_in_span(
        &self,
        state: S,
        req: Request<Incoming>,
        resolved: Resolved<'_, S>,
        method: &'static str,
        route: &'static str,
    ) -> Reply {
        let version = req.version();
        let started = tokio::time::Instant::now();
        let header_size = header_bytes(req.headers());
        let outcome = match resolved {
            _ if header_size > MAX_HEADER_BYTES => Err(ApiError::HeadersTooLarge(format!(
                "the request's header fields are {header_size} bytes, over the limit of \
                 {MAX_HEADER_BYTES}"
            ))),
            Resolved::Found(handler, params, _) => {
                // The handler is called inside the barrier too, in case building its future panics.
                let handler = Arc::clone(handler);
                AssertUnwindSafe(async move { handler(state, req, params).await })
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|payload| Err(ApiError::panicked(&*payload)))
            }
            Resolved::MethodNotAllowed(allow, _) => Err(ApiError::MethodNotAllowed {
                message: format!(
                    "method {} is not allowed on {}; allowed: {allow}",
                    req.method(),
                    echo(req.uri().path())
                ),
                allow,
            }),
            Resolved::NotFound => Err(ApiError::NotFound(format!(
                "no route for {}",
                echo(req.uri().path())
            ))),
        };
        let mut response = outcome.unwrap_or_else(ApiError::into_response);
        let refused_unread = matches!(
            response.status(),
            http::StatusCode::PAYLOAD_TOO_LARGE | http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        if refused_unread && version <= Version::HTTP_11 {
            // The rest of the body may still be on its way: do not read it, close instead.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        tracing::Span::current().record("status", response.status().as_u16());
        if self.metered {
            metrics::request(route, method, response.status(), started.elapsed());
        }
        tracing::debug!("answered");
        response
    }
}

/// The name of a request's exported span, `{method} {route}`, written without allocating.
#[derive(Debug, Clone, Copy)]
struct SpanName {
    method: &'static str,
    route: &'static str,
}

impl std::fmt::Display for SpanName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.route)
    }
}

/// `text`, cut to a length that is safe to echo back to the client.
/// How many items a paginated listing (`GET /objects`, `GET /failures`) returns unless
/// `limit` says otherwise.
pub(crate) const DEFAULT_PAGE: usize = 1_000;
/// The largest `limit` a paginated listing accepts.
pub(crate) const MAX_PAGE: usize = 10_000;

/// The `limit` query parameter of a paginated listing: [`DEFAULT_PAGE`] when absent, else
/// an integer from 1 to [`MAX_PAGE`].
pub(crate) fn page_limit(raw: Option<&str>) -> Result<usize, ApiError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_PAGE);
    };
    raw.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| {
            ApiError::InvalidQuery(format!(
                "query parameter `limit` must be an integer from 1 to {MAX_PAGE}, got {:?}",
                echo(raw)
            ))
        })
}

pub(crate) fn echo(text: &str) -> String {
    match text.char_indices().nth(ECHO_MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router<()> {
        async fn nothing(_: (), _: Request<Incoming>, _: PathParams) -> HandlerResult {
            Err(ApiError::NotFound("nothing".into()))
        }
        Router::new()
            .route(Method::GET, "/", nothing)
            .route(Method::GET, "/objects", nothing)
            .route(Method::GET, "/objects/{id}", nothing)
            .route(Method::POST, "/callback", nothing)
            .route(Method::PUT, "/callback", nothing)
    }

    fn resolve(method: Method, path: &str) -> Result<PathParams, Option<String>> {
        match router().resolve(&method, path) {
            Resolved::Found(_, params, _) => Ok(params),
            Resolved::MethodNotAllowed(allow, _) => Err(Some(allow)),
            Resolved::NotFound => Err(None),
        }
    }

    #[test]
    fn literal_and_parameter_segments_match_exactly() {
        assert_eq!(resolve(Method::GET, "/"), Ok(PathParams::default()));
        assert_eq!(resolve(Method::GET, "/objects"), Ok(PathParams::default()));
        let params = resolve(Method::GET, "/objects/42").unwrap();
        assert_eq!(params.get("id"), Some("42"));
        assert_eq!(params.get("other"), None);
        for missing in [
            "/objects/",
            "/objects/1/2",
            "//objects",
            "/object",
            "/callback/x",
        ] {
            assert_eq!(resolve(Method::GET, missing), Err(None), "{missing}");
        }
    }

    #[test]
    fn a_known_path_with_another_method_lists_the_allowed_ones() {
        assert_eq!(
            resolve(Method::GET, "/callback"),
            Err(Some("POST, PUT".to_owned()))
        );
        assert_eq!(
            resolve(Method::DELETE, "/objects/1"),
            Err(Some("GET".to_owned()))
        );
        assert_eq!(resolve(Method::HEAD, "/"), Err(Some("GET".to_owned())));
    }

    #[test]
    fn echoed_text_is_cut() {
        assert_eq!(echo("/short"), "/short");
        let long = "x".repeat(500);
        assert_eq!(echo(&long).chars().count(), ECHO_MAX + 1);
    }
}
