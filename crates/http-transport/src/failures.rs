//! The admin listener's dead-letter routes: `GET /failures` (filtered, paginated, newest
//! first), `POST /failures/replay` (back into the inbox) and `DELETE /failures` (purge).
//!
//! Replay and purge take the same JSON selector, `{"ids":[…]}`, `{"code":"…"}`,
//! `{"since":"…","until":"…"}` (RFC 3339, since ≤ failed_at < until), any of them
//! together, or `{"all":true}`; an empty selector is refused, so an empty body never
//! replays or purges everything by accident.

use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use domain::{DeadLetter, FailureFilter, FailureQuery, ObjectId, Timestamp};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::admin::AdminState;
use crate::error::ApiError;
use crate::json::{FailureJson, json_response};
use crate::router::{HandlerResult, PathParams, echo, page_limit};

/// The most ids one selector names (each is a bind parameter on SQLite).
const MAX_SELECTED_IDS: usize = 10_000;
/// The largest selector body read.
const MAX_SELECTOR_BYTES: usize = 1 << 20;
/// How long a client may take to send a selector.
const SELECTOR_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
struct FailuresJson {
    failures: Vec<FailureJson>,
    /// The `after` of the next page, or `null` on the last one.
    next_after: Option<i64>,
}

/// The dead letters a query selects, newest first, with the cursor of the next page.
pub(crate) async fn list(
    state: Arc<AdminState>,
    req: Request<Incoming>,
    _: PathParams,
) -> HandlerResult {
    let query = parse_query(req.uri().query())?;
    let letters: Vec<DeadLetter> = state.app.failures(&query).await?;
    let next_after = if letters.len() >= query.limit {
        letters.last().map(|letter| letter.seq)
    } else {
        None
    };
    let failures = letters.into_iter().map(FailureJson::from).collect();
    json_response(
        StatusCode::OK,
        &FailuresJson {
            failures,
            next_after,
        },
    )
}

#[derive(Debug, Serialize)]
struct ReplayedJson {
    replayed: u64,
}

#[derive(Debug, Serialize)]
struct PurgedJson {
    purged: u64,
}

/// Puts the selected dead letters back in the inbox, in one transaction.
pub(crate) async fn replay(
    state: Arc<AdminState>,
    req: Request<Incoming>,
    _: PathParams,
) -> HandlerResult {
    let filter = read_selector(req).await?;
    let replayed = state.app.replay_failures(&filter).await?;
    json_response(StatusCode::OK, &ReplayedJson { replayed })
}

/// Deletes the selected dead letters.
pub(crate) async fn purge(
    state: Arc<AdminState>,
    req: Request<Incoming>,
    _: PathParams,
) -> HandlerResult {
    let filter = read_selector(req).await?;
    let purged = state.app.purge_failures(&filter).await?;
    json_response(StatusCode::OK, &PurgedJson { purged })
}

/// The query of `GET /failures`: `code`, `since`, `until`, `ids` (comma-separated),
/// `after` (a `seq` cursor) and `limit`; other parameters are ignored, repeated ones
/// refused.
fn parse_query(query: Option<&str>) -> Result<FailureQuery, ApiError> {
    const NAMES: [&str; 6] = ["code", "since", "until", "ids", "after", "limit"];
    let mut values: [Option<&str>; 6] = [None; 6];
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(slot) = NAMES.iter().position(|known| *known == name) else {
            continue;
        };
        if values[slot].replace(value).is_some() {
            return Err(ApiError::InvalidQuery(format!(
                "query parameter `{name}` is given more than once"
            )));
        }
    }
    let [code, since, until, ids, after, limit] = values;
    let bad = |name: &str, what: &str, raw: &str| {
        ApiError::InvalidQuery(format!(
            "query parameter `{name}` must be {what}, got {:?}",
            echo(raw)
        ))
    };
    let time = |name: &'static str, raw: Option<&str>| {
        raw.map(|raw| parse_time(raw).ok_or_else(|| bad(name, "an RFC 3339 time", raw)))
            .transpose()
    };
    let ids = ids
        .map(|raw| {
            let ids = raw
                .split(',')
                .map(|one| one.parse::<ObjectId>().ok())
                .collect::<Option<Vec<ObjectId>>>()
                .ok_or_else(|| bad("ids", "comma-separated object ids", raw))?;
            check_id_count(ids.len())?;
            Ok::<_, ApiError>(ids)
        })
        .transpose()?;
    let before = after
        .map(|raw| {
            raw.parse::<i64>()
                .map_err(|_| bad("after", "the `next_after` of the previous page", raw))
        })
        .transpose()?;
    let limit = page_limit(limit)?;
    Ok(FailureQuery {
        filter: FailureFilter {
            ids,
            code: code.map(str::to_owned),
            since: time("since", since)?,
            until: time("until", until)?,
        },
        before,
        limit,
    })
}

fn check_id_count(n: usize) -> Result<(), ApiError> {
    if n > MAX_SELECTED_IDS {
        return Err(ApiError::PayloadTooLarge(format!(
            "{n} ids selected; at most {MAX_SELECTED_IDS} at once"
        )));
    }
    Ok(())
}

/// An RFC 3339 time (e.g. `2026-12-06T04:00:00Z`), to the microsecond.
fn parse_time(raw: &str) -> Option<Timestamp> {
    // A `+` of an offset arrives as a space when the client did not percent-encode it.
    let raw = raw
        .replace("%2B", "+")
        .replace("%3A", ":")
        .replace(' ', "+");
    let time = DateTime::parse_from_rfc3339(&raw).ok()?;
    Some(Timestamp::from_unix_micros(time.timestamp_micros()))
}

/// The JSON body of replay and purge.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorJson {
    #[serde(default)]
    ids: Option<Vec<i64>>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    all: bool,
}

/// Reads and checks a selector body.
async fn read_selector(req: Request<Incoming>) -> Result<FailureFilter, ApiError> {
    let read = Limited::new(req.into_body(), MAX_SELECTOR_BYTES).collect();
    let body = match tokio::time::timeout(SELECTOR_READ_TIMEOUT, read).await {
        Err(_elapsed) => {
            return Err(ApiError::RequestTimeout(format!(
                "request body was not received within {SELECTOR_READ_TIMEOUT:?}"
            )));
        }
        Ok(Err(err)) => {
            return Err(ApiError::PayloadTooLarge(format!(
                "cannot read the selector (at most {MAX_SELECTOR_BYTES} bytes): {err}"
            )));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    selector(&body)
}

/// A selector body as a filter.
fn selector(body: &[u8]) -> Result<FailureFilter, ApiError> {
    let json: SelectorJson = serde_json::from_slice(body).map_err(|err| {
        ApiError::InvalidJson(format!(
            "expected a selector such as {{\"ids\":[1,2]}}, {{\"code\":\"timeout\"}}, \
             {{\"since\":\"…\",\"until\":\"…\"}} or {{\"all\":true}}: {err}"
        ))
    })?;
    let ids = json
        .ids
        .map(|ids| {
            check_id_count(ids.len())?;
            ids.into_iter()
                .enumerate()
                .map(|(i, raw)| {
                    ObjectId::new(raw)
                        .map_err(|err| ApiError::InvalidObjectId(format!("ids[{i}] {err}")))
                })
                .collect::<Result<Vec<ObjectId>, ApiError>>()
        })
        .transpose()?;
    let time = |name: &str, raw: Option<String>| {
        raw.map(|raw| {
            parse_time(&raw).ok_or_else(|| {
                ApiError::InvalidJson(format!("`{name}` must be an RFC 3339 time, got {raw:?}"))
            })
        })
        .transpose()
    };
    let filter = FailureFilter {
        ids,
        code: json.code,
        since: time("since", json.since)?,
        until: time("until", json.until)?,
    };
    if filter == FailureFilter::default() && !json.all {
        return Err(ApiError::InvalidJson(
            "the selector selects nothing: give ids, code, since or until, or {\"all\":true}"
                .to_owned(),
        ));
    }
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(raw: i64) -> ObjectId {
        ObjectId::new(raw).unwrap()
    }

    #[test]
    fn the_query_reads_every_filter_the_cursor_and_the_limit() {
        let query = parse_query(Some(
            "code=timeout&since=2026-12-06T04:00:00Z&until=2026-12-06T05:00:00.5%2B01:00\
             &ids=3,1&after=42&limit=7&other=x",
        ))
        .unwrap();
        assert_eq!(query.filter.code.as_deref(), Some("timeout"));
        assert_eq!(query.filter.ids, Some(vec![id(3), id(1)]));
        let since = query.filter.since.unwrap().as_unix_micros();
        let until = query.filter.until.unwrap().as_unix_micros();
        assert_eq!(until - since, 500_000, "05:00:00.5+01:00 is 04:00:00.5Z");
        assert_eq!((query.before, query.limit), (Some(42), 7));
        assert_eq!(
            parse_query(None).unwrap(),
            FailureQuery {
                limit: crate::router::DEFAULT_PAGE,
                ..FailureQuery::default()
            }
        );
    }

    #[test]
    fn bad_query_values_name_the_parameter() {
        for (query, named) in [
            ("since=yesterday", "`since`"),
            ("ids=1,-2", "`ids`"),
            ("after=x", "`after`"),
            ("limit=0", "`limit`"),
            ("limit=10001", "`limit`"),
            ("code=a&code=b", "`code`"),
        ] {
            let err = parse_query(Some(query)).unwrap_err();
            assert!(
                matches!(&err, ApiError::InvalidQuery(m) if m.contains(named)),
                "{query}: {err:?}"
            );
        }
    }

    #[test]
    fn a_selector_must_select_and_checks_what_it_names() {
        let all = selector(br#"{"all":true}"#).unwrap();
        assert_eq!(all, FailureFilter::default());
        let some =
            selector(br#"{"ids":[2,1],"code":"status","since":"2026-12-06T04:00:00Z"}"#).unwrap();
        assert_eq!(some.ids, Some(vec![id(2), id(1)]));
        assert_eq!(some.code.as_deref(), Some("status"));
        assert!(some.since.is_some() && some.until.is_none());

        assert!(
            matches!(selector(b"{}"), Err(ApiError::InvalidJson(m)) if m.contains("selects nothing"))
        );
        assert!(matches!(selector(b""), Err(ApiError::InvalidJson(_))));
        assert!(matches!(
            selector(br#"{"id":[1]}"#),
            Err(ApiError::InvalidJson(_))
        ));
        assert!(
            matches!(selector(br#"{"ids":[1,-1]}"#), Err(ApiError::InvalidObjectId(m)) if m.contains("ids[1]"))
        );
        assert!(
            matches!(selector(br#"{"until":"soon"}"#), Err(ApiError::InvalidJson(m)) if m.contains("`until`"))
        );
        let many = format!("{{\"ids\":[{}]}}", vec!["1"; 10_001].join(","));
        assert!(matches!(
            selector(many.as_bytes()),
            Err(ApiError::PayloadTooLarge(_))
        ));
    }
}
