//! Requests through the public router, served in-process by the same hyper settings as the
//! real listener over the domain's fakes (`http_transport::fuzzing::Harness`).
//!
//! The input is text, so seeds and crashes are readable:
//!
//! - `R` or `S` first: the rest goes on the connection as it is, then the client closes
//!   its sending half (`R`) or stalls (`S`). Checked: the server closes the connection
//!   (no hang, timeouts included), never answers `5xx`, and every JSON answer is a
//!   `202 {"accepted":n}`, a `200`, or an error envelope whose code matches its status.
//! - anything else is a request without framing: a first line `METHOD TARGET`, header
//!   lines `name: value`, an empty line, the body. The harness frames it
//!   (`content-length`, `connection: close`). Checked: exactly one answer, JSON, `2xx`
//!   only on routes that have one, errors in the envelope (`405` with `Allow`), and for
//!   `POST /callback` with a JSON body everything `check_callback` requires.

#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use http_transport::HttpConfig;
use http_transport::fuzzing::{
    CallbackOutcome, ClientEnd, Exchange, Harness, Response, check_callback,
    envelope_is_well_formed,
};
use libfuzzer_sys::fuzz_target;

/// Small limits, so that `413` for too many ids or too large a body is reachable.
static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    Harness::new(HttpConfig {
        max_body_bytes: 2_048,
        max_ids: 16,
        header_read_timeout: Duration::from_secs(1),
        body_read_timeout: Duration::from_secs(1),
        ..HttpConfig::default()
    })
});

/// The client preface that switches a connection to HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let harness = &*HARNESS;
    match data.split_first() {
        Some((b'R', wire)) => raw(harness, wire, ClientEnd::Close),
        Some((b'S', wire)) => raw(harness, wire, ClientEnd::Stall),
        _ => request(harness, data),
    }
});

fn raw(harness: &Harness, wire: &[u8], end: ClientEnd) {
    let exchange = harness.exchange(wire, end);
    assert!(
        exchange.closed,
        "the connection was never closed: {exchange:?}"
    );
    if wire.starts_with(H2_PREFACE) {
        return;
    }
    // An answer to `HEAD` has a `content-length` but no body, so after one the responses
    // cannot be told apart by their lengths alone: check the statuses only.
    let bodies_delimited = !wire.windows(4).any(|w| w.eq_ignore_ascii_case(b"HEAD"));
    for response in &exchange.responses {
        assert!(response.status < 500, "a 5xx: {exchange:?}");
        if bodies_delimited && response.header("content-type") == Some("application/json") {
            check_json_answer(response, &exchange);
        }
    }
}

fn request(harness: &Harness, data: &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split('\n');
    let first = lines.next().unwrap_or_default();
    let (method, target) = first.split_once(' ').unwrap_or((first, "/"));
    let headers: Vec<(&str, &str)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim(), value.trim()))
        .collect();
    let Ok(exchange) = harness.request(method, target, &headers, body) else {
        // Not something HTTP/1.1 can carry: nothing was sent.
        return;
    };
    let [response] = exchange.responses.as_slice() else {
        panic!("not exactly one answer: {exchange:?}");
    };
    assert!(
        exchange.closed && exchange.unparsed.is_empty(),
        "{exchange:?}"
    );
    assert!(response.status < 500, "a 5xx: {exchange:?}");
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{exchange:?}"
    );
    let path = target.split('?').next().unwrap_or_default();
    if method == "HEAD" {
        // No body to look at; HEAD has no route, so `405` or `404`.
        assert!(matches!(response.status, 404 | 405), "{exchange:?}");
        return;
    }
    check_json_answer(response, &exchange);
    if response.status == 405 {
        assert!(response.header("allow").is_some(), "{exchange:?}");
    }
    match (response.status, method, path) {
        (202, "POST", "/callback") | (200, "GET", "/" | "/objects") => {}
        (200..=299, ..) => panic!("a 2xx on a route that has none: {exchange:?}"),
        _ => {}
    }
    // The handler looks at the first `content-type` only.
    let json = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .and_then(|(_, value)| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    let config = harness.config();
    if method == "POST"
        && path == "/callback"
        && json
        && body.len() <= config.max_body_bytes
        && let Err(wrong) = check_callback(body, config.max_ids, &response.callback_outcome())
    {
        panic!("{wrong}");
    }
}

/// A JSON answer is a `202 {"accepted":n}`, a `200`, or a well-formed error envelope.
fn check_json_answer(response: &Response, exchange: &Exchange) {
    match response.callback_outcome() {
        CallbackOutcome::Accepted { .. } => {
            assert_eq!(response.status, 202, "{exchange:?}");
        }
        CallbackOutcome::Rejected {
            status,
            code,
            message,
        } => {
            assert!(
                envelope_is_well_formed(status, &code, &message),
                "{exchange:?}"
            );
        }
        CallbackOutcome::Malformed { status, .. } => {
            assert_eq!(status, 200, "{exchange:?}");
        }
    }
}
