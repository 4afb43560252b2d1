//! The public API: `POST /callback`, `GET /` (health), `GET /livez` and `GET /readyz`
//! (probes), `GET /objects`, `GET /objects/{id}`.

use std::sync::Arc;
use std::time::Duration;

use domain::{Application, ObjectId, StoredObject};
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;

use crate::HttpConfig;
use crate::auth::Auth;
use crate::callback::post_callback;
use crate::error::ApiError;
use crate::json::{ObjectJson, StatsJson, json_response};
use crate::router::{HandlerResult, PathParams, Router, echo, page_limit};

/// How long clients are told to wait when the health check fails.
const HEALTH_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The request limits the handlers enforce.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_body_bytes: usize,
    pub(crate) max_ids: usize,
    pub(crate) body_read_timeout: Duration,
}

/// What every public handler gets.
#[derive(Debug)]
pub(crate) struct ApiState {
    pub(crate) app: Application,
    pub(crate) limits: Limits,
    /// Bytes the callbacks in progress may hold together ([`HttpConfig::max_body_memory_bytes`]).
    pub(crate) body_memory: Arc<Semaphore>,
    pub(crate) body_memory_bytes: usize,
    /// Who may call ([`HttpConfig::auth`]), and the `webhook-id`s seen.
    pub(crate) auth: Auth,
}

impl ApiState {
    pub(crate) fn new(app: Application, config: &HttpConfig) -> Self {
        Self {
            app,
            limits: Limits {
                max_body_bytes: config.max_body_bytes,
                max_ids: config.max_ids,
                body_read_timeout: config.body_read_timeout,
            },
            body_memory: Arc::new(Semaphore::new(
                config.max_body_memory_bytes.min(Semaphore::MAX_PERMITS),
            )),
            body_memory_bytes: config.max_body_memory_bytes,
            auth: Auth::new(config.auth.clone()),
        }
    }
}

/// The routes of the public listener.
pub(crate) fn router() -> Router<Arc<ApiState>> {
    Router::new()
        .route(Method::GET, "/", health)
        .route(Method::GET, "/livez", livez)
        .route(Method::GET, "/readyz", readyz)
        .route(Method::POST, "/callback", post_callback)
        .route(Method::GET, "/objects", list_objects)
        .route(Method::GET, "/objects/{id}", get_object)
}

#[derive(Debug, Serialize)]
struct HealthOkJson {
    status: &'static str,
    components: Value,
    pipeline: StatsJson,
}

/// `200` when the database answers, `503` naming the failing component otherwise.
async fn health(state: Arc<ApiState>, _: Request<Incoming>, _: PathParams) -> HandlerResult {
    let health = state.app.health().await;
    let pipeline = StatsJson::from(health.pipeline);
    // A failing upstream is reported but keeps the status 200: callbacks are still
    // accepted and wait in the inbox until it answers again.
    let breaker = &health.breaker;
    let mut breaker_json = json!({
        "state": breaker.state.as_str(),
        "consecutive_failures": breaker.consecutive_failures,
    });
    if let Some(probe_in) = breaker.probe_in {
        breaker_json["probe_in_ms"] =
            Value::from(u64::try_from(probe_in.as_millis()).unwrap_or(u64::MAX));
    }
    let upstream = match &health.upstream {
        Ok(()) => json!({ "status": "ok", "breaker": breaker_json }),
        Err(cause) => json!({ "status": "failing", "error": cause, "breaker": breaker_json }),
    };
    match health.database {
        Ok(()) => json_response(
            StatusCode::OK,
            &HealthOkJson {
                status: "ok",
                components: json!({ "database": { "status": "ok" }, "upstream": upstream }),
                pipeline,
            },
        ),
        Err(err) => {
            let mut details = Map::new();
            details.insert("status".to_owned(), Value::from("unavailable"));
            details.insert(
                "components".to_owned(),
                json!({
                    "database": { "status": "down", "error": err.to_string() },
                    "upstream": upstream,
                }),
            );
            details.insert(
                "pipeline".to_owned(),
                serde_json::to_value(pipeline).unwrap_or(Value::Null),
            );
            Err(ApiError::Unavailable {
                message: err.to_string(),
                retry_after: HEALTH_RETRY_AFTER,
                details: Some(details),
            })
        }
    }
}

/// `200` while the process serves requests: a liveness probe. It asks nothing of the
/// database or the upstream, so their outages never get a healthy process restarted
/// (a restart would mend neither).
async fn livez(_: Arc<ApiState>, _: Request<Incoming>, _: PathParams) -> HandlerResult {
    json_response(StatusCode::OK, &json!({ "status": "alive" }))
}

/// `200` when this instance can take callbacks, else `503` naming the component: a
/// readiness probe. Answers at once from what is known (the database's part is the last
/// background ping), so a probe's short timeout never makes it look down. Not logged per
/// request: each change of readiness is logged once where it is found.
async fn readyz(state: Arc<ApiState>, _: Request<Incoming>, _: PathParams) -> HandlerResult {
    match state.app.readiness() {
        Ok(()) => json_response(StatusCode::OK, &json!({ "status": "ready" })),
        Err(cause) => Err(ApiError::NotReady {
            message: cause.to_string(),
            component: cause.component(),
        }),
    }
}

/// The query of `GET /objects`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PageQuery {
    after: Option<ObjectId>,
    limit: usize,
}

impl PageQuery {
    /// Reads `after` and `limit`; other parameters are ignored, repeated ones refused.
    fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut after = None;
        let mut limit = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match name {
                "after" => &mut after,
                "limit" => &mut limit,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(ApiError::InvalidQuery(format!(
                    "query parameter `{name}` is given more than once"
                )));
            }
        }
        let after = after
            .map(|raw| {
                raw.parse::<ObjectId>()
                    .map_err(|err| ApiError::InvalidQuery(format!("query parameter `after` {err}")))
            })
            .transpose()?;
        let limit = page_limit(limit)?;
        Ok(Self { after, limit })
    }
}

#[derive(Debug, Serialize)]
struct PageJson {
    objects: Vec<ObjectJson>,
    next_after: Option<i64>,
}

/// Up to `limit` stored objects after `after`, with the cursor of the next page.
async fn list_objects(
    state: Arc<ApiState>,
    req: Request<Incoming>,
    _: PathParams,
) -> HandlerResult {
    state.auth.check_read(req.headers())?;
    let query = PageQuery::parse(req.uri().query())?;
    let objects: Vec<StoredObject> = state.app.objects(query.after, query.limit).await?;
    let next_after = if objects.len() >= query.limit {
        objects.last().map(|o| o.id.get())
    } else {
        None
    };
    json_response(
        StatusCode::OK,
        &PageJson {
            objects: objects.into_iter().map(ObjectJson).collect(),
            next_after,
        },
    )
}

/// The stored object `{id}`, or `404` when it is absent or expired.
async fn get_object(
    state: Arc<ApiState>,
    req: Request<Incoming>,
    params: PathParams,
) -> HandlerResult {
    state.auth.check_read(req.headers())?;
    let raw = params.get("id").unwrap_or_default();
    let id = raw.parse::<ObjectId>().map_err(|err| {
        ApiError::InvalidObjectId(format!(
            "object id {:?} in the path is not valid: it {err}",
            echo(raw)
        ))
    })?;
    match state.app.object(id).await? {
        Some(object) => json_response(StatusCode::OK, &ObjectJson(object)),
        None => Err(ApiError::NotFound(format!("object {id} is not stored"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(q: &str) -> Result<(Option<i64>, usize), String> {
        PageQuery::parse(Some(q))
            .map(|p| (p.after.map(ObjectId::get), p.limit))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_valid_values() {
        assert_eq!(
            PageQuery::parse(None).map(|p| (p.after, p.limit)),
            Ok((None, crate::router::DEFAULT_PAGE))
        );
        assert_eq!(query(""), Ok((None, crate::router::DEFAULT_PAGE)));
        assert_eq!(query("after=0&limit=1"), Ok((Some(0), 1)));
        assert_eq!(query("limit=10000&x=y&&after=5"), Ok((Some(5), 10_000)));
    }

    #[test]
    fn bad_values_name_the_parameter() {
        for (q, name) in [
            ("after=-1", "`after`"),
            ("after=abc", "`after`"),
            ("after=", "`after`"),
            ("after=9223372036854775808", "`after`"),
            ("limit=0", "`limit`"),
            ("limit=10001", "`limit`"),
            ("limit=-5", "`limit`"),
            ("limit=ten", "`limit`"),
            ("limit", "`limit`"),
            ("limit=1&limit=2", "`limit`"),
        ] {
            let err = query(q).expect_err(q);
            assert!(err.contains(name), "{q}: {err}");
        }
    }
}
