//! The reqwest adapter of the [`ObjectSource`] port: asks the upstream API about one
//! object, `GET {base_url}/objects/{id}` → `{"id":N,"online":bool}`.
//!
//! One [`reqwest::Client`] (and so one keep-alive connection pool) serves every fetch.
//!
//! Transient failures (connect errors, timeouts, 5xx, 429) are retried in-process with
//! exponential backoff and jitter, briefly: the first attempt always gets the full
//! `request_timeout`; a retry is started only while at least [`MIN_RETRY_BUDGET`] is left
//! before `retry_deadline` (counted from the start of the fetch), and it gets only the
//! time left, at most `request_timeout`. So a fetch lasts at most
//! `max(request_timeout, retry_deadline)`, plus the first request's wait for the rate
//! limiter. Longer outages are the caller's business (the service hands the id back to
//! its durable retry schedule). Everything else is returned at once. See [`UpstreamConfig`].
//!
//! With `max_requests_per_second` set, every request (first attempts and retries, from
//! every clone of the source) first waits for its slot in one shared schedule; the wait
//! is not part of the request's timeout, but it is part of the fetch's retry deadline.
//!
//! Each fetch runs in an `upstream.fetch` span, and every request carries its trace
//! context (W3C `traceparent`, B3) when span export is on.

mod rate_limit;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use domain::{BoxFuture, FetchError, ObjectId, ObjectSource, ObjectStatus};
use reqwest::{StatusCode, Url, header};
use serde::Deserialize;
use tokio::time::Instant;

use crate::rate_limit::RateLimiter;

/// The upstream client's Prometheus series.
pub mod metrics {
    /// Upstream attempts retried after a transient failure.
    pub const UPSTREAM_RETRIES: &str = "upstream_retries_total";
    /// Upstream requests that waited for a slot of `max_requests_per_second`.
    pub const UPSTREAM_RATE_LIMITED: &str = "upstream_rate_limited_total";

    /// Describes the upstream client's series to the installed recorder.
    pub fn describe() {
        ::metrics::describe_counter!(
            UPSTREAM_RETRIES,
            ::metrics::Unit::Count,
            "upstream attempts retried after a transient failure (connect error, timeout, 5xx, 429)"
        );
        ::metrics::describe_counter!(
            UPSTREAM_RATE_LIMITED,
            ::metrics::Unit::Count,
            "upstream requests (first attempts and retries) that had to wait for their slot \
             under upstream max_requests_per_second"
        );
    }
}

/// The largest answer body accepted; anything longer is [`FetchError::Malformed`].
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The least time that must be left before `retry_deadline`, once the pause before a
/// retry is over, for the retry to be started (or `request_timeout`, when that is
/// shorter). Less than this is too short for a useful answer; the fetch gives up instead.
pub const MIN_RETRY_BUDGET: Duration = Duration::from_millis(100);

/// How much of a malformed body is quoted in the error message.
const BODY_PREFIX_CHARS: usize = 64;

/// How the upstream is reached and how hard we try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Where the upstream API lives, e.g. `http://127.0.0.1:9010`; `/objects/{id}` is appended.
    pub base_url: String,
    /// The bound on one attempt, from connecting until the whole body is read. The first
    /// attempt always gets all of it; a retry gets at most the time left before
    /// `retry_deadline`. A wait for the rate limiter comes before and is not part of it.
    pub request_timeout: Duration,
    /// The bound on establishing a TCP connection.
    pub connect_timeout: Duration,
    /// How long after the fetch began in-process retries may go on. A retry is started
    /// only when, after its pause, at least [`MIN_RETRY_BUDGET`] (or `request_timeout`, if
    /// shorter) is left before this deadline, and its timeout is the time left, at most
    /// `request_timeout`; a `Retry-After` that would push the retry past it ends the fetch
    /// at once. The first attempt is never cut short, so a fetch lasts at most
    /// `max(request_timeout, retry_deadline)`, plus the first request's rate-limit wait.
    /// Rate-limit waits count against this deadline: a retry whose slot would come too
    /// late is not made.
    pub retry_deadline: Duration,
    /// The pause before the first retry; it doubles after each one.
    pub retry_min_delay: Duration,
    /// The longest base pause between attempts (jitter adds up to as much again).
    pub retry_max_delay: Duration,
    /// How many idle keep-alive connections to the upstream the pool keeps.
    pub max_idle_per_host: usize,
    /// The most requests per second this source sends, on average, retries included and
    /// shared by all its clones; 0 = unlimited. Requests are spaced evenly, `1/rate`
    /// apart, with no burst allowance: a request waits for its slot before it is sent.
    pub max_requests_per_second: u32,
    /// An `https://` upstream: the CA certificates (PEM) its certificate must chain up to,
    /// instead of Mozilla's roots (a private CA). Its host name is always checked.
    pub tls_ca_file: Option<PathBuf>,
    /// An `https://` upstream that asks for a client certificate: ours and its key (PEM).
    pub tls_identity: Option<tls::Identity>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:9010".to_owned(),
            // The upstream answers within 4 s at worst.
            request_timeout: Duration::from_secs(5),
            // Past the kernel's first SYN retransmission (1 s): a connection dropped once
            // by a full accept queue still gets through.
            connect_timeout: Duration::from_secs(3),
            // In-process retries stay short: a blip costs no round trip to the database,
            // longer failures go back to the caller's durable retry schedule.
            retry_deadline: Duration::from_secs(2),
            retry_min_delay: Duration::from_millis(100),
            retry_max_delay: Duration::from_secs(2),
            max_idle_per_host: 128,
            max_requests_per_second: 0,
            tls_ca_file: None,
            tls_identity: None,
        }
    }
}

/// Why an [`HttpObjectSource`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// `base_url` is not an `http://` URL this adapter can use.
    #[error("invalid upstream base url {url:?}: {reason}")]
    InvalidBaseUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid upstream setting {key}: {reason}")]
    InvalidSetting {
        /// The [`UpstreamConfig`] field.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the upstream http client: {0}")]
    Client(String),
    /// The TLS settings cannot be used (a file missing or without a certificate), or are
    /// given for an `http://` upstream.
    #[error("invalid upstream TLS settings: {0}")]
    Tls(String),
}

/// Asks the upstream API over HTTP, through one shared connection pool.
#[derive(Debug, Clone)]
pub struct HttpObjectSource {
    client: reqwest::Client,
    /// `{base_url}/objects/`, ready for the id to be appended.
    objects_prefix: String,
    request_timeout: Duration,
    retry_deadline: Duration,
    backoff: ExponentialBuilder,
    /// Spaces the requests of this source and all its clones.
    limiter: Arc<RateLimiter>,
    /// Counts every retry, in [`metrics::UPSTREAM_RETRIES`].
    retries: ::metrics::Counter,
}

impl HttpObjectSource {
    /// Validates `config` and builds the client and its connection pool.
    pub fn new(config: UpstreamConfig) -> Result<Self, UpstreamError> {
        let objects_prefix = objects_prefix(&config.base_url)?;
        for (key, value) in [
            ("request_timeout", config.request_timeout),
            ("connect_timeout", config.connect_timeout),
            ("retry_deadline", config.retry_deadline),
        ] {
            if value.is_zero() {
                return Err(UpstreamError::InvalidSetting {
                    key,
                    reason: "must be greater than zero".to_owned(),
                });
            }
        }
        if config.retry_min_delay > config.retry_max_delay {
            return Err(UpstreamError::InvalidSetting {
                key: "retry_min_delay",
                reason: format!(
                    "{:?} must not exceed retry_max_delay {:?}",
                    config.retry_min_delay, config.retry_max_delay
                ),
            });
        }
        let tls = https_config(&config)?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(config.request_timeout)
            .connect_timeout(config.connect_timeout)
            .pool_max_idle_per_host(config.max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_keepalive(Duration::from_secs(60))
            .tcp_nodelay(true)
            .no_proxy()
            .user_agent(concat!("callback-service/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| UpstreamError::Client(error_chain(&err)))?;
        let backoff = ExponentialBuilder::new()
            .with_min_delay(config.retry_min_delay)
            .with_max_delay(config.retry_max_delay)
            .with_jitter()
            // The deadline, checked in `next_delay`, is what ends the retries.
            .without_max_times();
        Ok(Self {
            client,
            objects_prefix,
            request_timeout: config.request_timeout,
            retry_deadline: config.retry_deadline,
            backoff,
            limiter: Arc::new(RateLimiter::new(
                config.max_requests_per_second,
                ::metrics::counter!(metrics::UPSTREAM_RATE_LIMITED),
            )),
            retries: ::metrics::counter!(metrics::UPSTREAM_RETRIES),
        })
    }

    /// Fetches `id`, retrying transient failures while the retry budget lasts.
    #[tracing::instrument(
        name = "upstream.fetch",
        skip_all,
        fields(otel.kind = "client", object_id = %id)
    )]
    async fn fetch_with_retries(&self, id: ObjectId) -> Result<ObjectStatus, FetchError> {
        let started = Instant::now();
        // The latest slot of the rate limiter a retry may take and still have its budget.
        let latest_retry_slot = started
            + self
                .retry_deadline
                .saturating_sub(retry_budget(self.request_timeout));
        let mut backoff = self.backoff.build();
        let mut attempts = 1u32;
        // The first attempt always runs, and for the full timeout.
        self.limiter.acquire().await;
        let mut timeout = self.request_timeout;
        let result = loop {
            let failure = match self.attempt(id, timeout).await {
                Ok(status) => break Ok(status),
                Err(failure) if !failure.error.is_transient() => break Err(failure),
                Err(failure) => failure,
            };
            let Some(delay) = next_delay(
                started.elapsed(),
                backoff.next(),
                failure.retry_after,
                self.request_timeout,
                self.retry_deadline,
            ) else {
                break Err(failure);
            };
            tracing::debug!(error = %failure.error, retry_in = ?delay, "upstream attempt failed; retrying");
            tokio::time::sleep(delay).await;
            if !self.limiter.acquire_by(Some(latest_retry_slot)).await {
                tracing::debug!("no request slot left before the retry deadline");
                break Err(failure);
            }
            // The time left, measured now that the request is about to be sent.
            let Some(left) =
                retry_timeout(started.elapsed(), self.request_timeout, self.retry_deadline)
            else {
                break Err(failure);
            };
            timeout = left;
            attempts += 1;
            self.retries.increment(1);
        };
        match &result {
            Ok(status) => {
                tracing::debug!(online = status.online, attempts, "upstream answered");
            }
            Err(failure) => {
                tracing::debug!(error = %failure.error, attempts, elapsed = ?started.elapsed(), "upstream fetch failed");
            }
        }
        result.map_err(|failure| failure.error)
    }

    /// One request, bounded by `timeout` from when it is sent until its body is read, its
    /// answer checked and parsed; it carries the trace context of the current
    /// (`upstream.fetch`) span, so the upstream can continue the trace.
    async fn attempt(&self, id: ObjectId, timeout: Duration) -> Result<ObjectStatus, Failure> {
        let url = format!("{}{}", self.objects_prefix, id);
        let mut headers = header::HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            header::HeaderValue::from_static("application/json"),
        );
        trace_context::inject(&tracing::Span::current(), &mut headers);
        let mut response = self
            .client
            .get(url)
            .headers(headers)
            // Overrides the client-wide timeout for this request only.
            .timeout(timeout)
            .send()
            .await
            .map_err(|err| transport_failure(&err, timeout))?;
        let status = response.status();
        if status != StatusCode::OK {
            let retry_after = match status {
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => response
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|value| value.to_str().ok())
                    .and_then(parse_retry_after),
                _ => None,
            };
            // Read a small error body to the end so the connection can go back to the pool.
            if response
                .content_length()
                .is_some_and(|len| len <= MAX_BODY_BYTES as u64)
            {
                let _ = response.bytes().await;
            }
            return Err(Failure {
                error: FetchError::Status(status.as_u16()),
                retry_after,
            });
        }
        if let Some(len) = response.content_length()
            && len > MAX_BODY_BYTES as u64
        {
            return Err(Failure::from(FetchError::Malformed(format!(
                "body of {len} bytes exceeds the limit of {MAX_BODY_BYTES}"
            ))));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| transport_failure(&err, timeout))?
        {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(Failure::from(FetchError::Malformed(format!(
                    "body exceeds the limit of {MAX_BODY_BYTES} bytes"
                ))));
            }
            body.extend_from_slice(&chunk);
        }
        parse_answer(id, &body).map_err(Failure::from)
    }
}

/// Maps a reqwest error (while connecting, sending or reading) of a request that had
/// `timeout` to a [`FetchError`].
fn transport_failure(err: &reqwest::Error, timeout: Duration) -> Failure {
    // A connect timeout is a connect error: reporting it as the request timeout would
    // point the operator at the wrong setting.
    let error = if tls::is_permanent(err) {
        FetchError::Tls(error_chain(err))
    } else if err.is_connect() {
        FetchError::Unreachable(error_chain(err))
    } else if err.is_timeout() {
        FetchError::Timeout(timeout)
    } else {
        FetchError::Unreachable(error_chain(err))
    };
    Failure::from(error)
}

impl ObjectSource for HttpObjectSource {
    fn fetch(&self, id: ObjectId) -> BoxFuture<'_, Result<ObjectStatus, FetchError>> {
        Box::pin(self.fetch_with_retries(id))
    }
}

/// One failed attempt: the error, and how long the upstream asked us to wait, if it did.
#[derive(Debug)]
struct Failure {
    error: FetchError,
    retry_after: Option<Duration>,
}

impl From<FetchError> for Failure {
    fn from(error: FetchError) -> Self {
        Self {
            error,
            retry_after: None,
        }
    }
}

/// The pause before the next attempt, or `None` when, after it, less than the retry
/// budget would be left before the deadline (`elapsed` and `deadline` both count from
/// the start of the fetch).
///
/// `backoff` is the backoff's proposal (`None` when it is exhausted); a `Retry-After`
/// longer than it wins.
fn next_delay(
    elapsed: Duration,
    backoff: Option<Duration>,
    retry_after: Option<Duration>,
    request_timeout: Duration,
    deadline: Duration,
) -> Option<Duration> {
    let backoff = backoff?;
    let delay = retry_after.map_or(backoff, |asked| asked.max(backoff));
    let left = deadline.checked_sub(elapsed.checked_add(delay)?)?;
    (left >= retry_budget(request_timeout)).then_some(delay)
}

/// The least time left before the deadline worth starting a retry for.
fn retry_budget(request_timeout: Duration) -> Duration {
    MIN_RETRY_BUDGET.min(request_timeout)
}

/// The timeout of a retry sent `elapsed` after the fetch began: the time left before the
/// deadline, at most `request_timeout`; `None` when nothing is left.
fn retry_timeout(
    elapsed: Duration,
    request_timeout: Duration,
    deadline: Duration,
) -> Option<Duration> {
    deadline
        .checked_sub(elapsed)
        .filter(|left| !left.is_zero())
        .map(|left| left.min(request_timeout))
}

/// Parses a `Retry-After` given in seconds; the HTTP-date form is not honoured.
fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The upstream's answer as the contract describes it; unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct Answer {
    id: i64,
    online: bool,
}

/// Parses and checks an answer body about `asked`.
fn parse_answer(asked: ObjectId, body: &[u8]) -> Result<ObjectStatus, FetchError> {
    let malformed = |reason: &dyn std::fmt::Display| {
        let text = String::from_utf8_lossy(body);
        let prefix: String = text.chars().take(BODY_PREFIX_CHARS).collect();
        let ellipsis = if prefix.len() < text.len() { "…" } else { "" };
        FetchError::Malformed(format!("{reason}; body starts with {prefix:?}{ellipsis}"))
    };
    // serde would also accept `[4,true]` for a struct; the contract promises an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(malformed(&"expected a json object"));
    }
    let answer: Answer = serde_json::from_slice(body).map_err(|err| malformed(&err))?;
    if answer.id != asked.get() {
        return Err(FetchError::IdMismatch {
            asked,
            got: answer.id,
        });
    }
    Ok(ObjectStatus {
        id: asked,
        online: answer.online,
    })
}

/// Checks `base_url` and returns `{base_url}/objects/`.
fn objects_prefix(base_url: &str) -> Result<String, UpstreamError> {
    let invalid = |reason: &str| UpstreamError::InvalidBaseUrl {
        url: base_url.to_owned(),
        reason: reason.to_owned(),
    };
    let url = Url::parse(base_url).map_err(|err| invalid(&err.to_string()))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(invalid(&format!(
                "scheme must be http or https, got {other:?}"
            )));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("a host is required"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("must not have a query or a fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("must not carry credentials"));
    }
    Ok(format!("{}/objects/", url.as_str().trim_end_matches('/')))
}

/// The rustls configuration for an `https://` upstream: Mozilla's roots or the private
/// CA's, host names checked, our certificate if given; HTTP/2 when the upstream offers it
/// (ALPN), HTTP/1.1 otherwise. An `http://` upstream gets one too (reqwest needs a TLS
/// backend), but no TLS setting may be given for it.
fn https_config(config: &UpstreamConfig) -> Result<tls::rustls::ClientConfig, UpstreamError> {
    let https = config.base_url.to_ascii_lowercase().starts_with("https://");
    if !https && (config.tls_ca_file.is_some() || config.tls_identity.is_some()) {
        return Err(UpstreamError::Tls(
            "a CA file or client certificate is set but the base url is http://".to_owned(),
        ));
    }
    let settings = tls::ClientSettings {
        verification: tls::Verification::Full,
        roots: match &config.tls_ca_file {
            Some(path) => tls::Roots::File(path.clone()),
            None => tls::Roots::Mozilla,
        },
        identity: config.tls_identity.clone(),
    };
    let mut rustls = tls::client_config(&settings).map_err(|err| {
        let mut text = err.to_string();
        append_sources(&mut text, std::error::Error::source(&err));
        UpstreamError::Tls(text)
    })?;
    rustls.alpn_protocols = tls::http_alpn();
    Ok(rustls)
}

/// An error and its sources, joined by `: `, without the URL reqwest adds.
fn error_chain(err: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = match err.url() {
        Some(_) => {
            let mut owned = String::new();
            // reqwest's Display ends with " for url (...)"; keep the kind of error only.
            let display = err.to_string();
            owned.push_str(display.split(" for url (").next().unwrap_or(&display));
            owned
        }
        None => err.to_string(),
    };
    append_sources(&mut text, err.source());
    text
}

/// Appends `source` and the errors under it to `text`, each after `: `, skipping a cause
/// whose text already ends `text` (reqwest repeats its source's message).
fn append_sources(text: &mut String, mut source: Option<&(dyn std::error::Error + 'static)>) {
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(raw: i64) -> ObjectId {
        ObjectId::new(raw).unwrap()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_retry_is_started_only_while_its_budget_is_left_before_the_deadline() {
        let timeout = 5000 * MS;
        let deadline = 2000 * MS;
        // After a pause of 100 ms, 2000 - 300 - 100 = 1600 ms are left.
        assert_eq!(
            next_delay(300 * MS, Some(100 * MS), None, timeout, deadline),
            Some(100 * MS)
        );
        // A request timeout longer than the deadline no longer rules out every retry.
        assert_eq!(
            next_delay(Duration::ZERO, Some(100 * MS), None, timeout, deadline),
            Some(100 * MS)
        );
        // Exactly the budget left is still fine...
        let last = deadline - 100 * MS - MIN_RETRY_BUDGET;
        assert_eq!(
            next_delay(last, Some(100 * MS), None, timeout, deadline),
            Some(100 * MS)
        );
        // ...a moment later it is not, and past the deadline nothing is.
        assert_eq!(
            next_delay(last + MS, Some(100 * MS), None, timeout, deadline),
            None
        );
        assert_eq!(
            next_delay(deadline + MS, Some(100 * MS), None, timeout, deadline),
            None
        );
        assert_eq!(
            next_delay(Duration::ZERO, None, None, timeout, deadline),
            None
        );
    }

    #[test]
    fn the_budget_is_at_most_the_request_timeout() {
        // With a 50 ms timeout a retry fits in 50 ms, less than MIN_RETRY_BUDGET.
        let timeout = 50 * MS;
        let deadline = 1000 * MS;
        assert_eq!(
            next_delay(900 * MS, Some(50 * MS), None, timeout, deadline),
            Some(50 * MS)
        );
        assert_eq!(
            next_delay(901 * MS, Some(50 * MS), None, timeout, deadline),
            None
        );
    }

    #[test]
    fn a_retry_gets_the_time_left_at_most_the_request_timeout() {
        let timeout = 5000 * MS;
        let deadline = 2000 * MS;
        assert_eq!(retry_timeout(1200 * MS, timeout, deadline), Some(800 * MS));
        assert_eq!(retry_timeout(100 * MS, 500 * MS, deadline), Some(500 * MS));
        assert_eq!(retry_timeout(deadline, timeout, deadline), None);
        assert_eq!(retry_timeout(deadline + MS, timeout, deadline), None);
    }

    #[test]
    fn retry_after_lengthens_the_pause_but_never_shortens_it() {
        let timeout = 200 * MS;
        let deadline = 5000 * MS;
        assert_eq!(
            next_delay(
                Duration::ZERO,
                Some(100 * MS),
                Some(1000 * MS),
                timeout,
                deadline
            ),
            Some(1000 * MS)
        );
        assert_eq!(
            next_delay(
                Duration::ZERO,
                Some(300 * MS),
                Some(Duration::ZERO),
                timeout,
                deadline
            ),
            Some(300 * MS)
        );
        // Asked to wait past the deadline, or so long that too little would be left:
        // give up now instead.
        assert_eq!(
            next_delay(
                Duration::ZERO,
                Some(100 * MS),
                Some(60_000 * MS),
                timeout,
                deadline
            ),
            None
        );
        assert_eq!(
            next_delay(
                Duration::ZERO,
                Some(100 * MS),
                Some(deadline - MS),
                timeout,
                deadline
            ),
            None
        );
    }

    #[test]
    fn retry_after_is_read_in_seconds_only() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn answers_are_parsed_and_checked() {
        assert_eq!(
            parse_answer(id(4), br#"{"id":4,"online":true,"extra":1}"#),
            Ok(ObjectStatus {
                id: id(4),
                online: true
            })
        );
        assert_eq!(
            parse_answer(id(4), br#"{"id":5,"online":true}"#),
            Err(FetchError::IdMismatch {
                asked: id(4),
                got: 5
            })
        );
        for bad in [
            &br#"{"id":4}"#[..],
            br#"{"id":"4","online":true}"#,
            br#"{"id":4,"online":"yes"}"#,
            br#"[4,true]"#,
            b"",
            b"\xff\xfe",
        ] {
            let err = parse_answer(id(4), bad).unwrap_err();
            assert!(matches!(err, FetchError::Malformed(_)), "{bad:?}: {err:?}");
        }
    }

    #[test]
    fn a_malformed_message_quotes_a_short_prefix_only() {
        let body = format!("<html>{}</html>", "x".repeat(10_000));
        let FetchError::Malformed(message) = parse_answer(id(1), body.as_bytes()).unwrap_err()
        else {
            panic!("expected malformed");
        };
        assert!(message.contains("<html>xxx"), "{message}");
        assert!(
            message.len() < 300,
            "message too long: {} bytes",
            message.len()
        );
    }

    #[test]
    fn base_urls_are_checked_and_the_bad_one_is_named() {
        assert_eq!(
            objects_prefix("http://127.0.0.1:9010").unwrap(),
            "http://127.0.0.1:9010/objects/"
        );
        assert_eq!(
            objects_prefix("http://upstream:9010/api/").unwrap(),
            "http://upstream:9010/api/objects/"
        );
        assert_eq!(
            objects_prefix("https://upstream.example").unwrap(),
            "https://upstream.example/objects/"
        );
        for bad in [
            "127.0.0.1:9010",
            "ftp://upstream",
            "http://upstream/?x=1",
            "http://user:pw@upstream",
            "not a url",
        ] {
            let err = HttpObjectSource::new(UpstreamConfig {
                base_url: bad.to_owned(),
                ..UpstreamConfig::default()
            })
            .unwrap_err();
            assert!(
                matches!(err, UpstreamError::InvalidBaseUrl { .. }),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains(bad), "{err} does not name {bad}");
        }
    }

    #[test]
    fn zero_timeouts_and_inverted_delays_are_rejected() {
        let err = HttpObjectSource::new(UpstreamConfig {
            request_timeout: Duration::ZERO,
            ..UpstreamConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("request_timeout"), "{err}");
        let err = HttpObjectSource::new(UpstreamConfig {
            retry_min_delay: Duration::from_secs(3),
            ..UpstreamConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("retry_min_delay"), "{err}");
    }
}
