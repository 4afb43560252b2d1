//! Every way a request can fail, and the one place that turns a failure into a response.

use std::any::Any;
use std::time::Duration;

use domain::{AcceptError, StoreError};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value};

use crate::ProfileError;
use crate::json::{Reply, json_bytes_response};

/// Why a request was not served; [`ApiError::into_response`] maps it to status and envelope.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum ApiError {
    /// The body is not the JSON the route expects (400).
    #[error("{0}")]
    InvalidJson(String),
    /// A query parameter has a bad value (400).
    #[error("{0}")]
    InvalidQuery(String),
    /// The request could not be read (400).
    #[error("{0}")]
    BadRequest(String),
    /// The caller did not prove who it is (401); see `auth`.
    #[error("{message}")]
    Unauthorized {
        /// What to tell the client: what is missing or wrong, never a secret.
        message: String,
        /// The value of the `WWW-Authenticate` header.
        challenge: &'static str,
    },
    /// An object id in the body or the path is not valid (422).
    #[error("{0}")]
    InvalidObjectId(String),
    /// The body, or the number of ids in it, is over a limit (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request's header fields are over [`crate::router::MAX_HEADER_BYTES`] (431).
    #[error("{0}")]
    HeadersTooLarge(String),
    /// The body is not declared as JSON (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The client was too slow sending the body (408).
    #[error("{0}")]
    RequestTimeout(String),
    /// No such route or no such object (404).
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method (405).
    #[error("{message}")]
    MethodNotAllowed {
        /// What to tell the client.
        message: String,
        /// The value of the `Allow` header.
        allow: String,
    },
    /// A CPU profile is already being taken; one runs at a time (409).
    #[error("{0}")]
    ProfileInProgress(String),
    /// Heap profiling is switched off by configuration (409).
    #[error("{0}")]
    HeapProfilingDisabled(String),
    /// This build or platform cannot do what the route offers (501).
    #[error("{0}")]
    NotSupported(String),
    /// `GET /readyz`: this instance cannot take callbacks now (503); `component` names
    /// why. Not logged per request: readiness logs each change once.
    #[error("{message}")]
    NotReady {
        /// What to tell the probe.
        message: String,
        /// `shutdown`, `database` or `backlog`.
        component: &'static str,
    },
    /// The service cannot take the request now; the client should retry (503).
    #[error("{message}")]
    Unavailable {
        /// What to tell the client.
        message: String,
        /// The value of the `Retry-After` header.
        retry_after: Duration,
        /// More fields for the envelope (the health route names its components).
        details: Option<Map<String, Value>>,
    },
    /// Anything unexpected: logged with its cause, answered opaquely (500).
    #[error("internal error: {cause}")]
    Internal {
        /// The cause, for the log only.
        cause: String,
    },
}

/// How long clients are told to wait when the database is unavailable.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

impl ApiError {
    /// A `503` that tells the client to come back after `retry_after`.
    pub(crate) fn unavailable(message: impl Into<String>, retry_after: Duration) -> Self {
        Self::Unavailable {
            message: message.into(),
            retry_after,
            details: None,
        }
    }

    /// A `500` for a handler that panicked, keeping the panic message for the log.
    pub(crate) fn panicked(payload: &(dyn Any + Send)) -> Self {
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a non-string payload");
        Self::Internal {
            cause: format!("handler panicked: {what}"),
        }
    }

    /// The response the client gets: status, envelope and headers, logged once.
    ///
    /// This is the only place that maps errors to statuses and envelope codes.
    pub(crate) fn into_response(self) -> Reply {
        let (status, code) = match &self {
            ApiError::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            ApiError::InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::InvalidObjectId(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_object_id"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::HeadersTooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
            ),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ApiError::ProfileInProgress(_) => (StatusCode::CONFLICT, "profile_in_progress"),
            ApiError::HeapProfilingDisabled(_) => (StatusCode::CONFLICT, "heap_profiling_disabled"),
            ApiError::NotSupported(_) => (StatusCode::NOT_IMPLEMENTED, "not_supported"),
            ApiError::NotReady { .. } => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            ApiError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };

        let message = match &self {
            ApiError::Internal { cause } => {
                tracing::error!(%cause, "request failed");
                "the server failed to handle the request".to_owned()
            }
            ApiError::Unavailable { message, .. } => {
                tracing::warn!(%message, "request refused: unavailable");
                message.clone()
            }
            other => {
                tracing::debug!(%code, message = %other, "request rejected");
                other.to_string()
            }
        };

        let mut envelope = Map::new();
        if let ApiError::Unavailable {
            details: Some(details),
            ..
        } = &self
        {
            envelope.extend(details.clone());
        }
        if let ApiError::NotReady { component, .. } = &self {
            envelope.insert("component".to_owned(), Value::from(*component));
        }
        envelope.insert("error".to_owned(), Value::from(code));
        envelope.insert("message".to_owned(), Value::from(message));
        // Serializing a map of strings cannot fail; fall back to a fixed body all the same.
        let body = serde_json::to_vec(&envelope)
            .unwrap_or_else(|_| format!(r#"{{"error":"{code}","message":"error"}}"#).into_bytes());

        let mut response = json_bytes_response(status, body);
        let headers = response.headers_mut();
        match self {
            ApiError::MethodNotAllowed { allow, .. } => {
                if let Ok(value) = HeaderValue::from_str(&allow) {
                    headers.insert(header::ALLOW, value);
                }
            }
            ApiError::Unavailable { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, retry_after_value(retry_after));
            }
            ApiError::Unauthorized { challenge, .. } => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            _ => {}
        }
        response
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
fn retry_after_value(retry_after: Duration) -> HeaderValue {
    let mut secs = retry_after.as_secs();
    if retry_after.subsec_nanos() > 0 {
        secs = secs.saturating_add(1);
    }
    HeaderValue::from(secs.max(1))
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(_) => ApiError::unavailable(err.to_string(), STORE_RETRY_AFTER),
            StoreError::Query(_) => ApiError::Internal {
                cause: err.to_string(),
            },
        }
    }
}

impl From<ProfileError> for ApiError {
    fn from(err: ProfileError) -> Self {
        match err {
            ProfileError::InProgress => ApiError::ProfileInProgress(err.to_string()),
            ProfileError::HeapProfilingDisabled(message) => {
                ApiError::HeapProfilingDisabled(message)
            }
            ProfileError::NotSupported(message) => ApiError::NotSupported(message),
            ProfileError::Failed(cause) => ApiError::Internal {
                cause: format!("profile failed: {cause}"),
            },
        }
    }
}

impl From<AcceptError> for ApiError {
    fn from(err: AcceptError) -> Self {
        ApiError::unavailable(err.to_string(), err.retry_after())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_json(reply: &Reply) -> Value {
        use http_body_util::BodyExt as _;
        let bytes = futures_util::FutureExt::now_or_never(reply.body().clone().collect())
            .expect("a full body is ready at once")
            .expect("infallible")
            .to_bytes();
        serde_json::from_slice(&bytes).expect("the envelope is json")
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_at_least_one() {
        assert_eq!(retry_after_value(Duration::ZERO), "1");
        assert_eq!(retry_after_value(Duration::from_millis(10)), "1");
        assert_eq!(retry_after_value(Duration::from_secs(2)), "2");
        assert_eq!(retry_after_value(Duration::from_millis(2_500)), "3");
    }

    #[test]
    fn store_errors_map_to_503_or_an_opaque_500() {
        let unavailable = ApiError::from(StoreError::Unavailable("refused".into())).into_response();
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unavailable.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            unavailable.headers()[header::CONTENT_TYPE],
            "application/json"
        );
        let body = body_json(&unavailable);
        assert_eq!(body["error"], "unavailable");
        assert_eq!(body["message"], "database unavailable: refused");

        let query =
            ApiError::from(StoreError::Query("syntax error at SELECT".into())).into_response();
        assert_eq!(query.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = body_json(&query);
        assert_eq!(body["error"], "internal_error");
        assert!(
            !body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("SELECT"),
            "the cause stays in the log: {body}"
        );
    }

    #[test]
    fn details_are_merged_into_the_envelope() {
        let mut details = Map::new();
        details.insert("status".into(), Value::from("unavailable"));
        let reply = ApiError::Unavailable {
            message: "database unavailable: gone".into(),
            retry_after: Duration::from_secs(1),
            details: Some(details),
        }
        .into_response();
        let body = body_json(&reply);
        assert_eq!(body["status"], "unavailable");
        assert_eq!(body["error"], "unavailable");
        assert_eq!(body["message"], "database unavailable: gone");
    }

    #[test]
    fn panics_keep_their_message_for_the_log() {
        let payload: Box<dyn Any + Send> = Box::new("boom");
        assert_eq!(
            ApiError::panicked(&*payload),
            ApiError::Internal {
                cause: "handler panicked: boom".into()
            }
        );
        let payload: Box<dyn Any + Send> = Box::new(String::from("bang"));
        assert_eq!(
            ApiError::panicked(&*payload),
            ApiError::Internal {
                cause: "handler panicked: bang".into()
            }
        );
    }
}
