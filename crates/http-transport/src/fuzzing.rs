//! Entry points for the fuzz targets under `fuzz/` and the hostile-input property tests
//! (feature `fuzzing`); not a stable API.
//!
//! - [`parse_callback_body`]: what `POST /callback` answers to a body, without a server.
//! - [`check_callback`]: whether such an answer is the one the API contract requires,
//!   judged by a model that shares no code with the parser ([`expected_callback`]).
//! - [`Harness`]: the public router served in-process over an in-memory connection,
//!   HTTP/1 bytes in and responses out, over the domain's fakes on a paused tokio clock, so
//!   timeouts elapse at once when nothing else can happen.
//!
//! Nothing here panics, whatever the input.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use domain::testing::{MemoryStore, PausedClock};
use domain::{
    Application, BoxFuture, DistinctIds, ExpiryWaker, FetchError, NoTracePropagation, ObjectId,
    ObjectSource, ObjectStatus, Pipeline, PipelineConfig,
};
use futures_util::FutureExt as _;
use http::{HeaderName, HeaderValue, Method, header};
use http_body_util::BodyExt as _;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserializer as _;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Notify;

use crate::HttpConfig;
use crate::api::{self, ApiState};
use crate::callback::parse_callback;
use crate::json::Reply;
use crate::router::Router;
use crate::server;

/// What `POST /callback` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// `202 {"accepted":distinct}`.
    Accepted {
        /// How many distinct ids the answer says were accepted.
        distinct: usize,
    },
    /// Any other status, with the error envelope.
    Rejected {
        /// The status code.
        status: u16,
        /// The envelope's `error`.
        code: String,
        /// The envelope's `message`.
        message: String,
    },
    /// An answer that is neither of the above: always a bug.
    Malformed {
        /// The status code, `0` when there was no (single) response at all.
        status: u16,
        /// What came instead, for the failure message.
        body: String,
    },
}

impl CallbackOutcome {
    /// Reads an answer from its status and body.
    pub fn from_response(status: u16, body: &[u8]) -> Self {
        let malformed = || Self::Malformed {
            status,
            body: String::from_utf8_lossy(body).into_owned(),
        };
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
            return malformed();
        };
        if status == 202 {
            return match (fields.len(), fields.get("accepted").and_then(Value::as_u64)) {
                (1, Some(n)) => usize::try_from(n)
                    .map_or_else(|_| malformed(), |distinct| Self::Accepted { distinct }),
                _ => malformed(),
            };
        }
        match (
            fields.get("error").and_then(Value::as_str),
            fields.get("message").and_then(Value::as_str),
        ) {
            (Some(code), Some(message)) => Self::Rejected {
                status,
                code: code.to_owned(),
                message: message.to_owned(),
            },
            _ => malformed(),
        }
    }
}

/// What `POST /callback` answers to `body` with at most `max_ids` ids: the parser and the
/// error rendering of the real handler, without a server or an application.
pub fn parse_callback_body(body: &[u8], max_ids: usize) -> CallbackOutcome {
    match parse_callback(body, max_ids) {
        Ok(ids) => CallbackOutcome::Accepted {
            distinct: ids.into_iter().collect::<DistinctIds>().len(),
        },
        Err(err) => {
            let reply = err.into_response();
            let status = reply.status().as_u16();
            CallbackOutcome::from_response(status, &full_body(reply))
        }
    }
}

/// The bytes of a response this crate built (a full body, ready at once).
fn full_body(reply: Reply) -> Bytes {
    reply
        .into_body()
        .collect()
        .now_or_never()
        .and_then(Result::ok)
        .map(|collected| collected.to_bytes())
        .unwrap_or_default()
}

/// What the API contract requires for one callback body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// `202` with this many distinct ids.
    Accepted {
        /// The distinct count.
        distinct: usize,
    },
    /// `400 invalid_json`.
    InvalidJson,
    /// `422 invalid_object_id`, the message naming `object_ids[index]`.
    InvalidObjectId {
        /// The first element that is not an id.
        index: usize,
    },
    /// `413 payload_too_large`: more elements than the limit.
    TooManyIds,
    /// `202` or any 4xx envelope: the body is JSON the strict model refuses (nesting deeper
    /// than serde_json's 128 levels, a lone UTF-16 surrogate escape, a number beyond f64)
    /// while the parser may skip the offending part, so the model cannot judge it.
    Undecided,
}

/// Errors of the strict model that the streaming parser need not share; see
/// [`Expected::Undecided`].
const STRICTER_THAN_NEEDED: [&str; 4] = [
    "recursion limit exceeded",
    "lone leading surrogate in hex escape",
    "unexpected end of hex escape",
    "number out of range",
];

/// The answer the contract requires for `body`, worked out the slow, obvious way: the whole
/// body as a `serde_json::Value`, then the API contract's rules (README's API section and
/// `docs/openapi.json`) element by element.
///
/// The rules: the body must be UTF-8 JSON (no BOM, nothing after the value) whose top
/// level is an object with exactly one `object_ids` key holding an array; otherwise `400`.
/// Walking the array in order, the element at index `max_ids` gives `413`, and the first
/// element before it that is not a non-negative integer literal within i64 (`-0`, `1.0`,
/// `1e3`, `2^63` are not) gives `422`; otherwise `202` with the distinct count.
pub fn expected_callback(body: &[u8], max_ids: usize) -> Expected {
    let Ok(text) = std::str::from_utf8(body) else {
        return Expected::InvalidJson;
    };
    let value = match serde_json::from_str::<Value>(text) {
        Ok(value) => value,
        Err(err) => {
            let message = err.to_string();
            return if STRICTER_THAN_NEEDED.iter().any(|m| message.starts_with(m)) {
                Expected::Undecided
            } else {
                Expected::InvalidJson
            };
        }
    };
    // `Value` keeps the last of duplicate keys: count them on the text.
    if count_object_ids_keys(text) != Some(1) {
        return Expected::InvalidJson;
    }
    let Some(Value::Array(items)) = value.get("object_ids") else {
        return Expected::InvalidJson;
    };
    let mut distinct = BTreeSet::new();
    for (index, item) in items.iter().enumerate() {
        if index == max_ids {
            return Expected::TooManyIds;
        }
        match item.as_u64().filter(|&id| i64::try_from(id).is_ok()) {
            Some(id) => {
                distinct.insert(id);
            }
            None => return Expected::InvalidObjectId { index },
        }
    }
    Expected::Accepted {
        distinct: distinct.len(),
    }
}

/// How many top-level keys of the JSON object `text` are `object_ids`; `None` when `text`
/// is not a JSON object.
fn count_object_ids_keys(text: &str) -> Option<usize> {
    struct Count;
    impl<'de> Visitor<'de> for Count {
        type Value = usize;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
            let mut count = 0;
            while let Some((key, IgnoredAny)) = map.next_entry::<String, IgnoredAny>()? {
                count += usize::from(key == "object_ids");
            }
            Ok(count)
        }
    }
    serde_json::Deserializer::from_str(text)
        .deserialize_map(Count)
        .ok()
}

/// Checks that `outcome` is what the contract requires for `body` (see
/// [`expected_callback`]); the error says what was expected and what came.
pub fn check_callback(
    body: &[u8],
    max_ids: usize,
    outcome: &CallbackOutcome,
) -> Result<(), String> {
    let expected = expected_callback(body, max_ids);
    let ok = match (expected, outcome) {
        (_, CallbackOutcome::Malformed { .. }) => false,
        (
            _,
            CallbackOutcome::Rejected {
                status,
                code,
                message,
            },
        ) if !envelope_is_well_formed(*status, code, message) => false,
        (Expected::Accepted { distinct }, CallbackOutcome::Accepted { distinct: got }) => {
            distinct == *got
        }
        (Expected::InvalidJson, CallbackOutcome::Rejected { status, code, .. }) => {
            *status == 400 && code == "invalid_json"
        }
        (
            Expected::InvalidObjectId { index },
            CallbackOutcome::Rejected {
                status,
                code,
                message,
            },
        ) => {
            *status == 422
                && code == "invalid_object_id"
                && message.starts_with(&format!("object_ids[{index}] "))
        }
        (Expected::TooManyIds, CallbackOutcome::Rejected { status, code, .. }) => {
            *status == 413 && code == "payload_too_large"
        }
        (Expected::Undecided, CallbackOutcome::Accepted { .. }) => true,
        (Expected::Undecided, CallbackOutcome::Rejected { status, .. }) => {
            (400..500).contains(status)
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "body {:?}: expected {expected:?}, got {outcome:?}",
            String::from_utf8_lossy(body)
        ))
    }
}

/// Whether an error envelope is well formed: `code` is one `status` may carry and
/// `message` says something, starting in lowercase (it may end with echoed text, so a
/// trailing dot is not judged here).
pub fn envelope_is_well_formed(status: u16, code: &str, message: &str) -> bool {
    let codes: &[&str] = match status {
        400 => &["invalid_json", "invalid_query", "bad_request"],
        404 => &["not_found"],
        405 => &["method_not_allowed"],
        408 => &["request_timeout"],
        413 => &["payload_too_large"],
        415 => &["unsupported_media_type"],
        422 => &["invalid_object_id"],
        500 => &["internal_error"],
        503 => &["unavailable"],
        _ => &[],
    };
    codes.contains(&code)
        && !message.is_empty()
        && !message.starts_with(|c: char| c.is_ascii_uppercase())
}

/// An upstream that reports every object offline at once, so the fake store stays empty
/// however many callbacks are accepted.
#[derive(Debug)]
struct OfflineSource;

impl ObjectSource for OfflineSource {
    fn fetch(&self, id: ObjectId) -> BoxFuture<'_, Result<ObjectStatus, FetchError>> {
        Box::pin(std::future::ready(Ok(ObjectStatus { id, online: false })))
    }
}

/// What the harness's client does once it has written its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEnd {
    /// Shuts its sending half (a TCP half-close), then reads until the server closes.
    Close,
    /// Keeps its sending half open and silent, as a stalled client does, and reads until
    /// the server closes.
    Stall,
}

/// One HTTP/1 response read off the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The header fields, in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty for `1xx`, `204`, `304` and answers to `HEAD`).
    pub body: Vec<u8>,
}

impl Response {
    /// The value of the first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// This response read as an answer to `POST /callback`.
    pub fn callback_outcome(&self) -> CallbackOutcome {
        CallbackOutcome::from_response(self.status, &self.body)
    }
}

/// What one connection carried back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// The responses, in order.
    pub responses: Vec<Response>,
    /// What came after the last whole response (empty unless the server misbehaved, or
    /// the connection switched to HTTP/2).
    pub unparsed: Vec<u8>,
    /// Whether the server closed the connection within [`Harness::DEADLINE`].
    pub closed: bool,
}

/// Connection headers [`Harness::request`] sets itself.
const FRAMING_HEADERS: [HeaderName; 8] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::CONNECTION,
    header::HOST,
    header::TE,
    header::UPGRADE,
    header::EXPECT,
    HeaderName::from_static("keep-alive"),
];

/// How much each direction of the in-memory connection buffers.
const DUPLEX_CAPACITY: usize = 64 * 1024;

/// The public router served in-process over the domain's fakes (memory store, an upstream
/// that reports everything offline, no backlog limit) on a paused tokio clock.
///
/// Each exchange opens an in-memory connection served with the same hyper settings and the
/// same first-request timeout as the real listener, writes the client's bytes and reads
/// until the server closes. The clock is paused and advances only when every task waits,
/// so a timeout the server relies on elapses at once and a server that would hang shows
/// as [`Exchange::closed`] being false after [`Harness::DEADLINE`] of virtual time.
#[derive(Debug)]
pub struct Harness {
    runtime: tokio::runtime::Runtime,
    router: Arc<Router<Arc<ApiState>>>,
    state: Arc<ApiState>,
    config: HttpConfig,
    _pipeline: Pipeline,
}

impl Harness {
    /// How long, on the paused clock, an exchange may last before it counts as hung.
    pub const DEADLINE: Duration = Duration::from_secs(300);

    /// A harness whose server enforces `config` (its `max_connections` and
    /// `shutdown_grace` do not apply).
    ///
    /// # Panics
    ///
    /// When the operating system refuses a tokio runtime; never because of a request.
    pub fn new(config: HttpConfig) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a current-thread tokio runtime");
        let (pipeline, state) = {
            let _entered = runtime.enter();
            let store = Arc::new(MemoryStore::new());
            let clock = Arc::new(PausedClock::new());
            let pipeline = Pipeline::start(
                Arc::new(OfflineSource),
                store.clone(),
                clock.clone(),
                ExpiryWaker::new(),
                Arc::new(NoTracePropagation),
                PipelineConfig {
                    max_pending_ids: usize::MAX,
                    // Fewer wake-ups while the paused clock jumps over timeouts.
                    poll_interval: Duration::from_secs(60),
                    ..PipelineConfig::default()
                },
            );
            let app = Application::new(pipeline.handle(), store, clock);
            (pipeline, Arc::new(ApiState::new(app, &config)))
        };
        Self {
            runtime,
            router: Arc::new(api::router()),
            state,
            config,
            _pipeline: pipeline,
        }
    }

    /// The limits this harness's server enforces.
    pub fn config(&self) -> &HttpConfig {
        &self.config
    }

    /// Opens a connection, writes `bytes` as they are, ends as `end` says and reads every
    /// response until the server closes the connection.
    pub fn exchange(&self, bytes: &[u8], end: ClientEnd) -> Exchange {
        let (output, closed) = self.talk(bytes, end);
        let (responses, unparsed) = parse_responses(&output, false);
        Exchange {
            responses,
            unparsed,
            closed,
        }
    }

    /// Sends one well-framed HTTP/1.1 request (`content-length` of `body`,
    /// `connection: close`) and reads the answer.
    ///
    /// `headers` must not set the framing itself (`content-length`, `transfer-encoding`,
    /// `connection`, `host`, `te`, `upgrade`, `expect`, `keep-alive`); a method, target or
    /// header that HTTP/1.1 cannot carry is refused with the reason, nothing sent.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Exchange, String> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| format!("{method:?} is not a method token"))?;
        if !target.starts_with('/')
            || !target.bytes().all(|b| b.is_ascii_graphic() && b != b'#')
            || http::uri::PathAndQuery::try_from(target).is_err()
        {
            return Err(format!("{target:?} is not an origin-form request target"));
        }
        let mut wire = format!(
            "{method} {target} HTTP/1.1\r\nhost: harness\r\nconnection: close\r\ncontent-length: {}\r\n",
            body.len()
        )
        .into_bytes();
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            if FRAMING_HEADERS.contains(&name) {
                return Err(format!("{name} is set by the harness"));
            }
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("{value:?} is not a header value"))?;
            wire.extend_from_slice(name.as_str().as_bytes());
            wire.extend_from_slice(b": ");
            wire.extend_from_slice(value.as_bytes());
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(body);
        let (output, closed) = self.talk(&wire, ClientEnd::Stall);
        let (responses, unparsed) = parse_responses(&output, method == Method::HEAD);
        Ok(Exchange {
            responses,
            unparsed,
            closed,
        })
    }

    /// `POST /callback` with `content-type: application/json` and `body`, read as a
    /// callback answer; anything but exactly one response is [`CallbackOutcome::Malformed`].
    pub fn post_callback(&self, body: &[u8]) -> CallbackOutcome {
        let exchange = match self.request(
            "POST",
            "/callback",
            &[("content-type", "application/json")],
            body,
        ) {
            Ok(exchange) => exchange,
            Err(reason) => {
                return CallbackOutcome::Malformed {
                    status: 0,
                    body: reason,
                };
            }
        };
        match exchange.responses.as_slice() {
            [response] if exchange.closed && exchange.unparsed.is_empty() => {
                response.callback_outcome()
            }
            _ => CallbackOutcome::Malformed {
                status: 0,
                body: format!("{exchange:?}"),
            },
        }
    }

    /// Serves one in-memory connection: writes `bytes`, ends as `end` says, returns what
    /// the server sent and whether it closed before [`Harness::DEADLINE`].
    fn talk(&self, bytes: &[u8], end: ClientEnd) -> (Vec<u8>, bool) {
        let builder = server::connection_builder(&server::Settings::from(&self.config));
        let router = Arc::clone(&self.router);
        let state = Arc::clone(&self.state);
        let first_request_timeout = self.config.header_read_timeout;
        self.runtime.block_on(async move {
            let (client, server_io) = tokio::io::duplex(DUPLEX_CAPACITY);
            let first_request = Arc::new(Notify::new());
            let notify = Arc::clone(&first_request);
            let service = service_fn(move |req| {
                notify.notify_one();
                let router = Arc::clone(&router);
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(router.dispatch(state, req).await) }
            });
            let server = tokio::spawn(async move {
                let conn = builder.serve_connection(TokioIo::new(server_io), service);
                // The real listener's driver; the connection cap is not under test.
                let permit = Arc::new(tokio::sync::Semaphore::new(1))
                    .try_acquire_owned()
                    .expect("a fresh semaphore has a permit");
                server::drive_connection(conn, first_request, first_request_timeout, permit).await;
            });

            let (mut reader, mut writer) = tokio::io::split(client);
            let mut output = Vec::new();
            let send = async {
                // The server may close before taking everything (a `413` does): stop then.
                if writer.write_all(bytes).await.is_ok() && end == ClientEnd::Close {
                    let _ = writer.shutdown().await;
                }
                // Returned so a stalled client keeps its half open until the server closes.
                writer
            };
            let receive = async {
                // A reset ends the exchange like a close.
                let _ = reader.read_to_end(&mut output).await;
            };
            let closed = tokio::time::timeout(Self::DEADLINE, async {
                let (_writer, ()) = tokio::join!(send, receive);
            })
            .await
            .is_ok();
            server.abort();
            (output, closed)
        })
    }
}

/// Splits what a server sent into HTTP/1 responses (bodies delimited by `content-length`,
/// or by the close); returns them and what follows the last whole one. `head`: the first
/// response answers a `HEAD` and has no body.
pub fn parse_responses(mut rest: &[u8], head: bool) -> (Vec<Response>, Vec<u8>) {
    let mut responses = Vec::new();
    while let Some((response, used)) = parse_response(rest, head && responses.is_empty()) {
        responses.push(response);
        rest = &rest[used..];
    }
    (responses, rest.to_vec())
}

/// One response at the start of `bytes` and its length in bytes, when it is whole.
fn parse_response(bytes: &[u8], head: bool) -> Option<(Response, usize)> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = std::str::from_utf8(&bytes[..head_end]).ok()?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let after_version = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))?;
    let status: u16 = after_version.get(..3)?.parse().ok()?;
    if !(100..600).contains(&status) {
        return None;
    }
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let body_start = head_end + 4;
    let response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let length = if head || (100..200).contains(&status) || status == 204 || status == 304 {
        0
    } else if let Some(length) = response.header("content-length") {
        length.parse().ok()?
    } else if response.header("transfer-encoding").is_some() {
        // This crate never answers chunked; leave it unparsed.
        return None;
    } else {
        // Delimited by the close.
        bytes.len() - body_start
    };
    let end = body_start.checked_add(length)?;
    let body = bytes.get(body_start..end)?.to_vec();
    Some((Response { body, ..response }, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_decides_the_named_cases() {
        let cases: [(&[u8], Expected); 9] = [
            (
                br#"{"object_ids":[1,1,2]}"#,
                Expected::Accepted { distinct: 2 },
            ),
            (
                br#"{"object_ids":[-0]}"#,
                Expected::InvalidObjectId { index: 0 },
            ),
            (
                br#"{"object_ids":[1e3]}"#,
                Expected::InvalidObjectId { index: 0 },
            ),
            (
                br#"{"object_ids":[1],"object_ids":[1]}"#,
                Expected::InvalidJson,
            ),
            (b"\xEF\xBB\xBF{\"object_ids\":[]}", Expected::InvalidJson),
            (br#"{"object_ids":[1e400]}"#, Expected::Undecided),
            (br#"{"object_ids":[1,2,3,"x"]}"#, Expected::TooManyIds),
            (
                b"{\"object_ids\":[1],\"x\":\"\xFF\"}",
                Expected::InvalidJson,
            ),
            (b"null", Expected::InvalidJson),
        ];
        for (body, expected) in cases {
            assert_eq!(expected_callback(body, 3), expected, "{body:?}");
        }
    }

    #[test]
    fn responses_are_split_by_their_length() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 400 Bad Request\r\n\r\nrest";
        let (responses, rest) = parse_responses(wire, false);
        let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [100, 202, 400]);
        assert_eq!(responses[1].body, b"{}");
        assert_eq!(responses[2].body, b"rest");
        assert!(rest.is_empty());
        let (responses, rest) =
            parse_responses(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}", false);
        assert!(responses.is_empty());
        assert_eq!(rest.len(), 40);
    }
}
