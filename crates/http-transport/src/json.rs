//! JSON responses and the wire shapes of domain types.

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat};
use domain::{DeadLetter, PipelineStats, StoredObject, Timestamp};
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde::ser::{Error as _, SerializeStruct as _};
use serde::{Serialize, Serializer};

use crate::error::ApiError;

/// Every response this crate sends.
pub(crate) type Reply = Response<Full<Bytes>>;

/// A response with `body` as its JSON content.
pub(crate) fn json_bytes_response(status: StatusCode, body: Vec<u8>) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A response with `value` serialized as JSON.
pub(crate) fn json_response<T: Serialize + ?Sized>(
    status: StatusCode,
    value: &T,
) -> Result<Reply, ApiError> {
    let body = serde_json::to_vec(value).map_err(|err| ApiError::Internal {
        cause: format!("failed to serialize the response: {err}"),
    })?;
    Ok(json_bytes_response(status, body))
}

/// An instant as RFC 3339 UTC text with microseconds, e.g. `2026-11-25T12:00:00.123456Z`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rfc3339(pub(crate) Timestamp);

impl Serialize for Rfc3339 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let micros = self.0.as_unix_micros();
        let time = DateTime::from_timestamp_micros(micros)
            .ok_or_else(|| S::Error::custom(format!("timestamp {micros} is out of range")))?;
        serializer.serialize_str(&time.to_rfc3339_opts(SecondsFormat::Micros, true))
    }
}

/// A stored object: `{"id":0,"last_seen":"…","expires_at":"…"}`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ObjectJson(pub(crate) StoredObject);

impl Serialize for ObjectJson {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Object", 3)?;
        s.serialize_field("id", &self.0.id.get())?;
        s.serialize_field("last_seen", &Rfc3339(self.0.last_seen))?;
        s.serialize_field("expires_at", &Rfc3339(self.0.expires_at))?;
        s.end()
    }
}

/// The pipeline's counters, one field each.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct StatsJson {
    accepted_callbacks: u64,
    accepted_ids: u64,
    group_commits: u64,
    fetches_started: u64,
    online: u64,
    offline: u64,
    failed: u64,
    retries_scheduled: u64,
    stored: u64,
    store_batches: u64,
    pending_ids: u64,
    oldest_pending_ms: u64,
    retrying_ids: u64,
    oldest_retrying_ms: u64,
}

impl From<PipelineStats> for StatsJson {
    fn from(stats: PipelineStats) -> Self {
        // Destructured so a new counter in the domain breaks the build here.
        let PipelineStats {
            accepted_callbacks,
            accepted_ids,
            group_commits,
            fetches_started,
            online,
            offline,
            failed,
            retries_scheduled,
            stored,
            store_batches,
            pending_ids,
            oldest_pending_ms,
            retrying_ids,
            oldest_retrying_ms,
        } = stats;
        Self {
            accepted_callbacks,
            accepted_ids,
            group_commits,
            fetches_started,
            online,
            offline,
            failed,
            retries_scheduled,
            stored,
            store_batches,
            pending_ids,
            oldest_pending_ms,
            retrying_ids,
            oldest_retrying_ms,
        }
    }
}

/// One dead letter:
/// `{"seq":…,"id":…,"code":"…","reason":"…","at":"…","attempts":…}`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FailureJson {
    seq: i64,
    id: i64,
    code: String,
    reason: String,
    at: Rfc3339,
    attempts: u32,
}

impl From<DeadLetter> for FailureJson {
    fn from(letter: DeadLetter) -> Self {
        let DeadLetter { seq, record } = letter;
        Self {
            seq,
            id: record.id.get(),
            code: record.code,
            reason: record.reason,
            at: Rfc3339(record.at),
            attempts: record.attempts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::ObjectId;

    #[test]
    fn objects_serialize_with_microsecond_utc_times() {
        // 2026-11-25T12:00:00.123456Z
        let last_seen = Timestamp::from_unix_micros(1_795_608_000_123_456);
        let object = StoredObject {
            id: ObjectId::new(7).unwrap(),
            last_seen,
            expires_at: last_seen.saturating_add(std::time::Duration::from_secs(30)),
        };
        let text = serde_json::to_string(&ObjectJson(object)).unwrap();
        assert_eq!(
            text,
            r#"{"id":7,"last_seen":"2026-11-25T12:00:00.123456Z","expires_at":"2026-11-25T12:00:30.123456Z"}"#
        );
    }

    #[test]
    fn an_unrepresentable_time_is_a_serialization_error() {
        let err = serde_json::to_string(&Rfc3339(Timestamp::from_unix_micros(i64::MAX)));
        assert!(err.is_err());
    }
}
