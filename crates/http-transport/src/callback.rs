//! `POST /callback`: content type, size limits, and a streaming parse of `object_ids` that
//! names the first bad element without building a `serde_json::Value`.

use std::fmt;
use std::sync::Arc;

use domain::{DistinctIds, ObjectId};
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserializer, Serialize};

use crate::api::ApiState;
use crate::error::ApiError;
use crate::json::json_response;
use crate::router::{HandlerResult, PathParams, echo};

/// What a `202` says.
#[derive(Debug, Serialize)]
struct AcceptedJson {
    accepted: usize,
}

/// Authenticates, checks, reads, verifies, parses and submits one callback.
pub(crate) async fn post_callback(
    state: Arc<ApiState>,
    req: Request<Incoming>,
    _: PathParams,
) -> HandlerResult {
    // Who is calling comes first: a caller without credentials learns nothing else. What
    // the headers prove is checked now; a signature once the body is in.
    let pending = state.auth.check_callback(req.headers(), state.app.now())?;
    require_json(req.headers())?;
    let limits = &state.limits;
    let declared = req.body().size_hint().lower();
    if declared > limits.max_body_bytes as u64 {
        return Err(ApiError::PayloadTooLarge(format!(
            "request body of {declared} bytes exceeds the limit of {} bytes",
            limits.max_body_bytes
        )));
    }
    // Memory stays bounded under a flood: the body (or, while its size is unknown, the
    // largest allowed) is reserved before it is read and kept until the callback is
    // recorded; when the budget is spent the answer is a fast 503, not a bigger heap.
    let _reserved = reserve_body_memory(&state, req.body().size_hint().exact())?;
    let read = Limited::new(req.into_body(), limits.max_body_bytes).collect();
    let body = match tokio::time::timeout(limits.body_read_timeout, read).await {
        Err(_elapsed) => {
            return Err(ApiError::RequestTimeout(format!(
                "request body was not received within {:?}",
                limits.body_read_timeout
            )));
        }
        Ok(Err(err)) if err.is::<LengthLimitError>() => {
            return Err(ApiError::PayloadTooLarge(format!(
                "request body exceeds the limit of {} bytes",
                limits.max_body_bytes
            )));
        }
        Ok(Err(err)) => {
            return Err(ApiError::BadRequest(format!(
                "failed to read the request body: {err}"
            )));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    // The signature covers the raw body: verified before it is parsed or recorded.
    let admitted = pending.verify(&body)?;
    let ids: DistinctIds = parse_callback(&body, limits.max_ids)?.into_iter().collect();
    let accepted = state.app.accept_callback(ids).await?;
    admitted.keep();
    json_response(
        StatusCode::ACCEPTED,
        &AcceptedJson {
            accepted: accepted.distinct,
        },
    )
}

/// The least a callback is charged, for what it holds beside its body.
const MIN_BODY_RESERVATION: usize = 4 * 1024;

/// How long a client refused for want of memory is asked to wait.
const BODY_MEMORY_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Reserves memory for one callback's body: its exact length when declared, the largest
/// allowed body otherwise (chunked), never less than [`MIN_BODY_RESERVATION`] nor more
/// than the whole budget.
fn reserve_body_memory(
    state: &ApiState,
    exact: Option<u64>,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let max_body = state.limits.max_body_bytes;
    let body = exact.map_or(max_body, |len| {
        usize::try_from(len).unwrap_or(max_body).min(max_body)
    });
    let wanted = body
        .max(MIN_BODY_RESERVATION)
        .min(state.body_memory_bytes)
        .max(1);
    let permits = u32::try_from(wanted).unwrap_or(u32::MAX);
    Arc::clone(&state.body_memory)
        .try_acquire_many_owned(permits)
        .map_err(|_| {
            crate::metrics::body_memory_exhausted();
            ApiError::unavailable(
                format!(
                    "too many callbacks are being received at once (their bodies may hold {} bytes together); retry later",
                    state.body_memory_bytes
                ),
                BODY_MEMORY_RETRY_AFTER,
            )
        })
}

/// Accepts `application/json` with any parameters, in any letter case.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::UnsupportedMediaType(
            "content-type application/json is required".to_owned(),
        ));
    };
    let essence = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    match essence {
        Some(essence) if essence.eq_ignore_ascii_case("application/json") => Ok(()),
        Some(other) => Err(ApiError::UnsupportedMediaType(format!(
            "content-type must be application/json, got {}",
            echo(other)
        ))),
        None => Err(ApiError::UnsupportedMediaType(
            "content-type must be application/json, got a value that is not text".to_owned(),
        )),
    }
}

/// Parses a callback body into its ids, in order, duplicates kept.
pub(crate) fn parse_callback(body: &[u8], max_ids: usize) -> Result<Vec<ObjectId>, ApiError> {
    // JSON text is UTF-8 (RFC 8259 §8.1). serde_json checks that only in the strings it
    // decodes, not in the fields skipped here, so without this a bad byte in an unknown
    // field would be accepted and the same byte in `object_ids` refused.
    let text = std::str::from_utf8(body).map_err(|err| {
        ApiError::InvalidJson(format!("invalid json: the body is not utf-8: {err}"))
    })?;
    let mut de = serde_json::Deserializer::from_str(text);
    let ids = CallbackSeed { max_ids }
        .deserialize(&mut de)
        .and_then(|ids| de.end().map(|()| ids))
        .map_err(|err| ApiError::InvalidJson(format!("invalid json: {err}")))?;
    match ids {
        IdList::Valid(ids) => Ok(ids),
        IdList::Invalid { index, got } => Err(ApiError::InvalidObjectId(format!(
            "object_ids[{index}] must be a non-negative integer that fits in i64, got {got}"
        ))),
        IdList::TooMany { limit } => Err(ApiError::PayloadTooLarge(format!(
            "object_ids may have at most {limit} elements"
        ))),
    }
}

/// The outcome of reading `object_ids`: the ids, or the first problem with them.
#[derive(Debug, PartialEq)]
enum IdList {
    Valid(Vec<ObjectId>),
    Invalid { index: usize, got: String },
    TooMany { limit: usize },
}

/// The top-level object: finds `object_ids`, skips every other field.
struct CallbackSeed {
    max_ids: usize,
}

impl<'de> DeserializeSeed<'de> for CallbackSeed {
    type Value = IdList;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<IdList, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for CallbackSeed {
    type Value = IdList;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a json object with an `object_ids` array")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IdList, A::Error> {
        let mut ids = None;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::ObjectIds if ids.is_some() => {
                    return Err(de::Error::duplicate_field("object_ids"));
                }
                Key::ObjectIds => {
                    ids = Some(map.next_value_seed(IdsSeed {
                        max_ids: self.max_ids,
                    })?);
                }
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        ids.ok_or_else(|| de::Error::missing_field("object_ids"))
    }
}

/// A field name of the top-level object.
enum Key {
    ObjectIds,
    Other,
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(if v == "object_ids" {
                    Key::ObjectIds
                } else {
                    Key::Other
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// The `object_ids` array: collects up to `max_ids` valid ids, stops at the first problem
/// and skips the rest (still checking that it is well-formed JSON).
struct IdsSeed {
    max_ids: usize,
}

impl<'de> DeserializeSeed<'de> for IdsSeed {
    type Value = IdList;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<IdList, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for IdsSeed {
    type Value = IdList;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of object ids")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<IdList, A::Error> {
        let hint = seq.size_hint().unwrap_or(0).min(self.max_ids);
        let mut ids = Vec::with_capacity(hint);
        let problem = loop {
            if ids.len() == self.max_ids {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(IdList::Valid(ids));
                }
                break IdList::TooMany {
                    limit: self.max_ids,
                };
            }
            match seq.next_element_seed(ElementSeed)? {
                None => return Ok(IdList::Valid(ids)),
                Some(Element::Valid(id)) => ids.push(id),
                Some(Element::Invalid(got)) => {
                    break IdList::Invalid {
                        index: ids.len(),
                        got,
                    };
                }
            }
        };
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(problem)
    }
}

/// One element of `object_ids`: an id, or a short description of what it was instead.
enum Element {
    Valid(ObjectId),
    Invalid(String),
}

/// Strings echoed in messages are cut to this many characters.
const STRING_ECHO_MAX: usize = 32;

struct ElementSeed;

impl<'de> DeserializeSeed<'de> for ElementSeed {
    type Value = Element;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Element, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ElementSeed {
    type Value = Element;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object id")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Element, E> {
        Ok(ObjectId::try_from(v).map_or_else(|_| Element::Invalid(v.to_string()), Element::Valid))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Element, E> {
        Ok(ObjectId::new(v).map_or_else(|_| Element::Invalid(v.to_string()), Element::Valid))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Element, E> {
        Ok(u64::try_from(v)
            .ok()
            .and_then(|v| ObjectId::try_from(v).ok())
            .map_or_else(|| Element::Invalid(v.to_string()), Element::Valid))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Element, E> {
        Ok(i64::try_from(v)
            .ok()
            .and_then(|v| ObjectId::new(v).ok())
            .map_or_else(|| Element::Invalid(v.to_string()), Element::Valid))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Element, E> {
        // serde_json reads every number with a fraction or an exponent as a float, and
        // integers beyond u64 too: none of them is an id, even `1.0` or `1e3`.
        Ok(Element::Invalid(format!("{v:?}")))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Element, E> {
        Ok(Element::Invalid(v.to_string()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Element, E> {
        let shown: String = v.chars().take(STRING_ECHO_MAX).collect();
        let more = if shown.len() < v.len() { "…" } else { "" };
        Ok(Element::Invalid(format!("the string {shown:?}{more}")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Element, E> {
        Ok(Element::Invalid("null".to_owned()))
    }

    fn visit_none<E: de::Error>(self) -> Result<Element, E> {
        self.visit_unit()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Element::Invalid("an array".to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Element, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Element::Invalid("an object".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Vec<i64>, ApiError> {
        parse_callback(body.as_bytes(), 10_000).map(|ids| ids.iter().map(|id| id.get()).collect())
    }

    fn invalid_json(body: &str) -> String {
        match parse(body) {
            Err(ApiError::InvalidJson(message)) => message,
            other => panic!("{body}: expected invalid_json, got {other:?}"),
        }
    }

    fn invalid_id(body: &str) -> String {
        match parse(body) {
            Err(ApiError::InvalidObjectId(message)) => message,
            other => panic!("{body}: expected invalid_object_id, got {other:?}"),
        }
    }

    #[test]
    fn valid_bodies_keep_order_and_duplicates() {
        assert_eq!(parse(r#"{"object_ids":[0,1,2,2]}"#), Ok(vec![0, 1, 2, 2]));
        assert_eq!(parse(r#"{"object_ids":[]}"#), Ok(vec![]));
        assert_eq!(
            parse(r#" { "object_ids" : [ 9223372036854775807 ] } "#),
            Ok(vec![i64::MAX])
        );
    }

    #[test]
    fn unknown_fields_are_ignored_wherever_they_are() {
        assert_eq!(
            parse(r#"{"a":{"b":[1,{"c":null}]},"object_ids":[5],"z":"x"}"#),
            Ok(vec![5])
        );
        assert_eq!(
            parse(r#"{"object_id\u0073":[5]}"#),
            Ok(vec![5]),
            "escaped key"
        );
    }

    #[test]
    fn syntax_and_shape_errors_are_invalid_json_with_a_position() {
        for body in [
            "",
            "{",
            r#"{"object_ids":[1,}"#,
            r#"{"object_ids":[1,2]"#,
            r#"{"object_ids":[1]} trailing"#,
            r#"{"object_ids":[01]}"#,
        ] {
            let message = invalid_json(body);
            assert!(message.contains("line 1 column"), "{body}: {message}");
        }
        assert!(invalid_json("[1,2]").contains("expected a json object"));
        assert!(invalid_json("{}").contains("missing field `object_ids`"));
        assert!(invalid_json(r#"{"other":1}"#).contains("missing field `object_ids`"));
        assert!(invalid_json(r#"{"object_ids":"1,2"}"#).contains("expected an array"));
        assert!(invalid_json(r#"{"object_ids":null}"#).contains("expected an array"));
        assert!(invalid_json(r#"{"object_ids":{"0":1}}"#).contains("expected an array"));
        assert!(
            invalid_json(r#"{"object_ids":[1],"object_ids":[2]}"#)
                .contains("duplicate field `object_ids`")
        );
        // A syntax error after a bad element is still a syntax error.
        invalid_json(r#"{"object_ids":[-1,]}"#);
    }

    #[test]
    fn a_body_that_is_not_utf8_is_invalid_json_wherever_the_bad_byte_is() {
        for body in [
            &b"{\"meta\":\"\xFF\",\"object_ids\":[1]}"[..],
            b"{\"object_ids\":[1],\"\xC0\x80\":0}",
            b"{\"object_ids\":[\"\xED\xA0\x80\"]}",
            b"{\"object_ids\":[1]}\xFE",
        ] {
            match parse_callback(body, 10) {
                Err(ApiError::InvalidJson(message)) => {
                    assert!(message.contains("not utf-8"), "{body:?}: {message}");
                }
                other => panic!("{body:?}: expected invalid_json, got {other:?}"),
            }
        }
    }

    #[test]
    fn bad_elements_are_named_by_index() {
        let cases = [
            (r#"{"object_ids":[0,1,-1]}"#, "object_ids[2]", "got -1"),
            (r#"{"object_ids":[1.5]}"#, "object_ids[0]", "got 1.5"),
            (r#"{"object_ids":[3,1.0]}"#, "object_ids[1]", "got 1.0"),
            (r#"{"object_ids":[1e3]}"#, "object_ids[0]", "got 1000.0"),
            (
                r#"{"object_ids":["7"]}"#,
                "object_ids[0]",
                r#"got the string "7""#,
            ),
            (r#"{"object_ids":[null]}"#, "object_ids[0]", "got null"),
            (r#"{"object_ids":[true]}"#, "object_ids[0]", "got true"),
            (
                r#"{"object_ids":[{"id":1}]}"#,
                "object_ids[0]",
                "got an object",
            ),
            (r#"{"object_ids":[[1]]}"#, "object_ids[0]", "got an array"),
            (
                r#"{"object_ids":[9223372036854775808]}"#,
                "object_ids[0]",
                "got 9223372036854775808",
            ),
            (r#"{"object_ids":[1e30]}"#, "object_ids[0]", "got 1e30"),
            (
                r#"{"object_ids":[99999999999999999999]}"#,
                "object_ids[0]",
                "got 1e20",
            ),
        ];
        for (body, index, got) in cases {
            let message = invalid_id(body);
            assert!(message.starts_with(index), "{body}: {message}");
            assert!(
                message.contains("must be a non-negative integer that fits in i64"),
                "{body}: {message}"
            );
            assert!(message.ends_with(got), "{body}: {message}");
        }
    }

    #[test]
    fn only_the_first_bad_element_is_reported() {
        let message = invalid_id(r#"{"object_ids":[1,"x",-2,{"a":[1,2]}]}"#);
        assert_eq!(
            message,
            r#"object_ids[1] must be a non-negative integer that fits in i64, got the string "x""#
        );
    }

    #[test]
    fn long_strings_are_cut_in_messages() {
        let long = "y".repeat(1_000);
        let message = invalid_id(&format!(r#"{{"object_ids":["{long}"]}}"#));
        assert!(message.len() < 200, "{message}");
        assert!(message.ends_with('…'), "{message}");
    }

    #[test]
    fn more_ids_than_the_limit_is_payload_too_large() {
        let at_limit = format!(r#"{{"object_ids":[{}]}}"#, vec!["1"; 10_000].join(","));
        assert_eq!(parse(&at_limit).map(|ids| ids.len()), Ok(10_000));
        let over = format!(r#"{{"object_ids":[{}]}}"#, vec!["1"; 10_001].join(","));
        match parse(&over) {
            Err(ApiError::PayloadTooLarge(message)) => assert!(message.contains("10000")),
            other => panic!("expected payload_too_large, got {other:?}"),
        }
        assert_eq!(
            parse_callback(br#"{"object_ids":[1,2,3,"x"]}"#, 3),
            Err(ApiError::PayloadTooLarge(
                "object_ids may have at most 3 elements".to_owned()
            ))
        );
        match parse_callback(br#"{"object_ids":[1,2,3,4]"#, 3) {
            Err(ApiError::InvalidJson(_)) => {}
            other => panic!("a syntax error wins, got {other:?}"),
        }
    }

    #[test]
    fn content_type_must_be_json_with_any_parameters() {
        let check = |value: Option<&'static str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            }
            require_json(&headers)
        };
        assert_eq!(check(Some("application/json")), Ok(()));
        assert_eq!(check(Some("Application/JSON; charset=utf-8")), Ok(()));
        assert_eq!(check(Some(" application/json ;charset=UTF-8")), Ok(()));
        assert!(matches!(
            check(Some("text/plain")),
            Err(ApiError::UnsupportedMediaType(m)) if m.contains("text/plain")
        ));
        assert!(matches!(
            check(Some("application/jsonx")),
            Err(ApiError::UnsupportedMediaType(_))
        ));
        assert!(matches!(
            check(None),
            Err(ApiError::UnsupportedMediaType(m)) if m.contains("required")
        ));
    }
}
