//! Hostile input (issue 7): property tests of the callback parser and of the router served
//! in-process, one table of the named edge cases with their defined answers, and bodies that
//! lie about their length or end early, on real sockets.
//!
//! The property tests compare every answer with `http_transport::fuzzing::check_callback`,
//! a model that shares no code with the parser: `202` with the distinct count exactly when
//! the body is a UTF-8 JSON object with one `object_ids` array of non-negative integer
//! literals within i64 and no more than `max_ids` of them, otherwise the envelope with the
//! status of the first problem (`400 invalid_json`, `413 payload_too_large`, `422
//! invalid_object_id` naming the element). Case counts are fixed and small so the suite stays
//! fast; the fuzz targets under `fuzz/` search for longer (fuzz/README.md).

use std::collections::BTreeSet;
use std::time::Duration;

use http_transport::HttpConfig;
use http_transport::fuzzing::{
    CallbackOutcome, Harness, check_callback, parse_callback_body, parse_responses,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio::io::AsyncWriteExt as _;

use crate::support::{Options, TestServer, raw_send, read_until_closed, within};

/// The default `http.max_ids`.
const MAX_IDS: usize = 10_000;

/// Runs `cases` cases of `strategy` through `test`, failing with the smallest failing input.
fn run<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    if let Err(failure) = runner.run(&strategy, test) {
        panic!("{failure}");
    }
}

/// Checks one body through the parser alone.
fn check_parse(body: &[u8], max_ids: usize) -> Result<(), TestCaseError> {
    check_callback(body, max_ids, &parse_callback_body(body, max_ids)).map_err(TestCaseError::fail)
}

/// A harness whose limits make `413` reachable with small bodies.
fn small_harness() -> Harness {
    Harness::new(HttpConfig {
        max_ids: 8,
        ..HttpConfig::default()
    })
}

/// An id: mostly small ones, so that lists repeat some.
fn id() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0u64..16,
        1 => 0..=i64::MAX as u64,
    ]
}

/// A valid callback body naming `ids`, in one of the shapes clients send: compact or
/// spaced, with unknown fields before or after, the key spelled with an escape or not.
fn callback() -> impl Strategy<Value = (Vec<u64>, Vec<u8>)> {
    (vec(id(), 0..24), any::<bool>(), 0..3usize, any::<bool>()).prop_map(
        |(ids, spaced, extra, escaped)| {
            let sep = if spaced { ", " } else { "," };
            let list: Vec<String> = ids.iter().map(u64::to_string).collect();
            let key = if escaped {
                r#""object_id\u0073""#
            } else {
                r#""object_ids""#
            };
            let ids_field = format!("{key}:[{}]", list.join(sep));
            let meta =
                r#""meta":{"n":[1,-2.5e-3,{"x":null}],"s":"é\n\ud83d\ude00","object_ids":0}"#;
            let fields = match extra {
                0 => ids_field,
                1 => format!("{meta}{sep}{ids_field}"),
                _ => format!("{ids_field}{sep}{meta}"),
            };
            let body = if spaced {
                format!(" \n{{ {fields} }}\t\r\n")
            } else {
                format!("{{{fields}}}")
            };
            (ids, body.into_bytes())
        },
    )
}

/// One edit of a body.
#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    Insert(usize, u8),
    Replace(usize, u8),
    Truncate(usize),
    Repeat(usize, usize),
}

impl Mutation {
    fn apply(&self, body: &mut Vec<u8>) {
        let at = |i: usize| i % (body.len() + 1);
        match *self {
            Mutation::Delete(i) if !body.is_empty() => {
                body.remove(i % body.len());
            }
            Mutation::Delete(_) => {}
            Mutation::Insert(i, byte) => body.insert(at(i), byte),
            Mutation::Replace(i, byte) if !body.is_empty() => {
                let i = i % body.len();
                body[i] = byte;
            }
            Mutation::Replace(_, byte) => body.push(byte),
            Mutation::Truncate(i) => body.truncate(at(i)),
            Mutation::Repeat(from, len) => {
                let from = at(from);
                let to = (from + len % 16).min(body.len());
                let copy = body[from..to].to_vec();
                body.splice(from..from, copy);
            }
        }
    }
}

/// Bytes that matter to JSON, and a few that must not appear.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        select(b"{}[],:\"\\-+.eE0123456789 \n\tnultrfasx\x00\x7f\xef\xbb\xbf\xff\xc0".to_vec()),
        any::<u8>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), interesting_byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), interesting_byte()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>()).prop_map(|(i, n)| Mutation::Repeat(i, n)),
    ]
}

/// A valid callback with one to four edits.
fn mutated_callback() -> impl Strategy<Value = Vec<u8>> {
    (callback(), vec(mutation(), 1..5)).prop_map(|((_, mut body), mutations)| {
        for m in &mutations {
            m.apply(&mut body);
        }
        body
    })
}

/// JSON-ish text: tokens that matter to the parser, in any order, often inside the start of
/// a callback so the element rules are reached.
fn token_soup() -> impl Strategy<Value = Vec<u8>> {
    const TOKENS: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        " ",
        r#""object_ids""#,
        r#""object_id\u0073""#,
        r#""other""#,
        "0",
        "7",
        "-1",
        "-0",
        "1e3",
        "1.0",
        "9223372036854775807",
        "9223372036854775808",
        "99999999999999999999",
        "1e400",
        "null",
        "true",
        r#""7""#,
        r#""\ud800""#,
        "\u{feff}",
        "\n",
    ];
    (
        any::<bool>(),
        vec(select(TOKENS), 0..32),
        select(vec!["", "]}", "]", "}"]),
    )
        .prop_map(|(prefixed, tokens, suffix)| {
            let prefix = if prefixed { r#"{"object_ids":["# } else { "" };
            format!("{prefix}{}{suffix}", tokens.concat()).into_bytes()
        })
}

#[test]
fn any_bytes_get_202_with_the_distinct_count_or_a_4xx_envelope() {
    run(
        4_096,
        (vec(any::<u8>(), 0..256), 0..12usize),
        |(body, max_ids)| check_parse(&body, max_ids),
    );
    let harness = small_harness();
    run(256, vec(any::<u8>(), 0..256), |body| {
        check_callback(&body, 8, &harness.post_callback(&body)).map_err(TestCaseError::fail)
    });
}

#[test]
fn valid_callbacks_are_accepted_with_their_distinct_count() {
    run(1_024, callback(), |(ids, body)| {
        let distinct = ids.iter().collect::<BTreeSet<_>>().len();
        prop_assert_eq!(
            parse_callback_body(&body, MAX_IDS),
            CallbackOutcome::Accepted { distinct }
        );
        Ok(())
    });
    let harness = Harness::new(HttpConfig::default());
    run(256, callback(), |(ids, body)| {
        let distinct = ids.iter().collect::<BTreeSet<_>>().len();
        prop_assert_eq!(
            harness.post_callback(&body),
            CallbackOutcome::Accepted { distinct }
        );
        Ok(())
    });
}

#[test]
fn mutated_callbacks_get_the_answer_the_model_requires() {
    run(
        4_096,
        (mutated_callback(), 0..12usize),
        |(body, max_ids)| {
            check_parse(&body, max_ids)?;
            check_parse(&body, MAX_IDS)
        },
    );
    let harness = small_harness();
    run(256, mutated_callback(), |body| {
        check_callback(&body, 8, &harness.post_callback(&body)).map_err(TestCaseError::fail)
    });
}

#[test]
fn json_token_soup_gets_the_answer_the_model_requires() {
    run(4_096, (token_soup(), 0..6usize), |(body, max_ids)| {
        check_parse(&body, max_ids)?;
        check_parse(&body, MAX_IDS)
    });
}

/// The defined answer to a body.
#[derive(Debug)]
enum Want {
    /// `202 {"accepted":n}`.
    Accepted(usize),
    /// The error envelope with this status and code, the message containing the text.
    Error(u16, &'static str, &'static str),
}

/// The edge cases issue 7 names, each with its defined answer, through the whole handler
/// (served in-process). fuzz/README.md has the same table, with the cases `callback.rs` and
/// the parser's unit tests already cover.
#[test]
fn named_edge_cases_get_their_defined_answer() {
    use Want::{Accepted, Error};
    let deep = 10_000;
    let open = "[".repeat(deep);
    let close = "]".repeat(deep);
    let deep_objects = format!(
        r#"{{"meta":{}1{},"object_ids":[7]}}"#,
        r#"{"a":"#.repeat(deep),
        "}".repeat(deep)
    );
    let long_integer = format!(r#"{{"object_ids":[1{}]}}"#, "0".repeat(400));
    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        // Deep nesting never recurses without bound: skipped values are walked with a
        // heap stack (bounded by the body limit), decoded ones stop at 128 levels.
        (
            "10 000 [ as the body",
            open.clone().into_bytes(),
            Error(400, "invalid_json", "invalid type: sequence"),
        ),
        (
            "10 000 [ as an element, never closed",
            format!(r#"{{"object_ids":{open}"#).into_bytes(),
            Error(400, "invalid_json", "EOF while parsing a list"),
        ),
        (
            "10 000 nested arrays as an element",
            format!(r#"{{"object_ids":[{open}{close}]}}"#).into_bytes(),
            Error(422, "invalid_object_id", "object_ids[0] must be"),
        ),
        (
            "10 000 nested arrays in an unknown field",
            format!(r#"{{"meta":{open}{close},"object_ids":[1,1]}}"#).into_bytes(),
            Accepted(1),
        ),
        (
            "10 000 nested objects in an unknown field",
            deep_objects.into_bytes(),
            Accepted(1),
        ),
        // Numbers: only non-negative integer literals within i64 are ids.
        (
            "1e400",
            br#"{"object_ids":[1e400]}"#.to_vec(),
            Error(400, "invalid_json", "number out of range"),
        ),
        (
            "a 401-digit integer",
            long_integer.into_bytes(),
            Error(400, "invalid_json", "number out of range"),
        ),
        (
            "99999999999999999999",
            br#"{"object_ids":[99999999999999999999]}"#.to_vec(),
            Error(422, "invalid_object_id", "got 1e20"),
        ),
        (
            "2^64",
            br#"{"object_ids":[18446744073709551616]}"#.to_vec(),
            Error(422, "invalid_object_id", "got 1.8446744073709552e19"),
        ),
        (
            "i64::MIN",
            br#"{"object_ids":[-9223372036854775808]}"#.to_vec(),
            Error(422, "invalid_object_id", "got -9223372036854775808"),
        ),
        (
            "-0",
            br#"{"object_ids":[0,-0]}"#.to_vec(),
            Error(
                422,
                "invalid_object_id",
                "object_ids[1] must be a non-negative integer that fits in i64, got -0.0",
            ),
        ),
        (
            "0e0",
            br#"{"object_ids":[0e0]}"#.to_vec(),
            Error(422, "invalid_object_id", "got 0.0"),
        ),
        (
            "NaN",
            br#"{"object_ids":[NaN]}"#.to_vec(),
            Error(400, "invalid_json", "expected value"),
        ),
        // Keys.
        (
            "object_ids twice",
            br#"{"object_ids":[1],"object_ids":[2]}"#.to_vec(),
            Error(400, "invalid_json", "duplicate field `object_ids`"),
        ),
        (
            "object_ids twice, once escaped",
            br#"{"object_ids":[1],"object_id\u0073":[2]}"#.to_vec(),
            Error(400, "invalid_json", "duplicate field `object_ids`"),
        ),
        // Encoding.
        (
            "a UTF-8 BOM",
            b"\xEF\xBB\xBF{\"object_ids\":[1]}".to_vec(),
            Error(400, "invalid_json", "expected value at line 1 column 1"),
        ),
        (
            "a byte that is not UTF-8 in an unknown field",
            b"{\"meta\":\"\xFF\",\"object_ids\":[1]}".to_vec(),
            Error(400, "invalid_json", "not utf-8"),
        ),
        (
            "UTF-16",
            "{\"object_ids\":[1]}"
                .encode_utf16()
                .flat_map(u16::to_le_bytes)
                .collect(),
            Error(400, "invalid_json", "key must be a string"),
        ),
        (
            "a lone surrogate escape in an unknown field",
            br#"{"note":"\ud800","object_ids":[1]}"#.to_vec(),
            Accepted(1),
        ),
        (
            "a lone surrogate escape as an element",
            br#"{"object_ids":["\ud800"]}"#.to_vec(),
            Error(400, "invalid_json", "unexpected end of hex escape"),
        ),
        (
            "a raw control character in a string",
            b"{\"note\":\"a\x01b\",\"object_ids\":[1]}".to_vec(),
            Error(400, "invalid_json", "control character"),
        ),
        // Shapes.
        (
            "null",
            b"null".to_vec(),
            Error(400, "invalid_json", "invalid type: null"),
        ),
        (
            "a top-level string",
            br#""object_ids""#.to_vec(),
            Error(400, "invalid_json", "invalid type: string"),
        ),
        (
            "trailing NUL",
            b"{\"object_ids\":[1]}\x00".to_vec(),
            Error(400, "invalid_json", "trailing characters"),
        ),
        (
            "trailing whitespace",
            b"{\"object_ids\":[1]}\r\n\t ".to_vec(),
            Accepted(1),
        ),
        (
            "whitespace only",
            b" \n".to_vec(),
            Error(400, "invalid_json", "EOF while parsing a value"),
        ),
    ];
    let harness = Harness::new(HttpConfig::default());
    for (name, body, want) in cases {
        let outcome = harness.post_callback(&body);
        match (&want, &outcome) {
            (Accepted(n), CallbackOutcome::Accepted { distinct }) if n == distinct => {}
            (
                Error(status, code, fragment),
                CallbackOutcome::Rejected {
                    status: got,
                    code: got_code,
                    message,
                },
            ) if status == got && code == got_code && message.contains(fragment) => {}
            _ => panic!("{name}: wanted {want:?}, got {outcome:?}"),
        }
        // The model agrees (it cannot judge the deep ones and says so).
        assert_eq!(
            check_callback(&body, MAX_IDS, &outcome),
            Ok(()),
            "{name}: the model disagrees"
        );
    }
}

// Bodies that lie about their length or end early, on real sockets.

fn quick_body_timeout() -> Options {
    Options {
        http: HttpConfig {
            body_read_timeout: Duration::from_millis(200),
            ..HttpConfig::default()
        },
        ..Options::default()
    }
}

const HEAD: &str = "POST /callback HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n";

/// Each answer the server sent on a connection, as its status and what it says: the envelope
/// code, `accepted n`, or the body as text (empty for hyper's own bare answers).
fn answers(seen: &[u8]) -> Vec<(u16, String)> {
    let (responses, rest) = parse_responses(seen, false);
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(seen));
    responses
        .iter()
        .map(|response| {
            let says = match response.callback_outcome() {
                CallbackOutcome::Accepted { distinct } => format!("accepted {distinct}"),
                CallbackOutcome::Rejected { code, .. } => code,
                CallbackOutcome::Malformed { body, .. } => body,
            };
            (response.status, says)
        })
        .collect()
}

/// `(status, says)` pairs to compare with [`answers`].
fn want(pairs: &[(u16, &str)]) -> Vec<(u16, String)> {
    pairs
        .iter()
        .map(|&(status, says)| (status, says.to_owned()))
        .collect()
}

/// How many callbacks and distinct ids the server accepted so far.
async fn accepted(server: &TestServer) -> (u64, u64) {
    let stats = server.admin_get("/stats").await;
    (
        stats.json["accepted_callbacks"].as_u64().unwrap(),
        stats.json["accepted_ids"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn a_body_shorter_than_its_length_then_a_close_is_a_400_and_not_accepted() {
    let server = TestServer::start_with(quick_body_timeout()).await;

    // The client stops sending (a half-close): the body can never be complete.
    let wire = format!("{HEAD}content-length: 100\r\n\r\n{{\"object_ids\":[1]}}");
    let mut stream = raw_send(server.addr, wire.as_bytes()).await;
    stream.shutdown().await.unwrap();
    let seen = read_until_closed(&mut stream).await;
    assert_eq!(answers(&seen), want(&[(400, "bad_request")]));
    let (responses, _) = parse_responses(&seen, false);
    let outcome = responses[0].callback_outcome();
    assert!(
        matches!(&outcome, CallbackOutcome::Rejected { message, .. }
            if message.starts_with("failed to read the request body")),
        "{outcome:?}"
    );

    // The client goes away altogether: nothing to answer, nothing accepted.
    drop(raw_send(server.addr, wire.as_bytes()).await);

    // Chunked, ending inside a chunk.
    let wire = format!("{HEAD}transfer-encoding: chunked\r\n\r\n20\r\n{{\"object_ids\":[1]}}");
    let mut stream = raw_send(server.addr, wire.as_bytes()).await;
    stream.shutdown().await.unwrap();
    let seen = read_until_closed(&mut stream).await;
    assert_eq!(answers(&seen), want(&[(400, "bad_request")]));

    assert_eq!(accepted(&server).await, (0, 0));
    server.stop().await;
}

#[tokio::test]
async fn a_chunked_body_that_stops_arriving_is_a_request_timeout() {
    let server = TestServer::start_with(quick_body_timeout()).await;
    let wire = format!("{HEAD}transfer-encoding: chunked\r\n\r\n20\r\n{{\"object_ids\":[1]}}");
    // The client keeps the connection open and silent; the server answers and closes.
    let mut stream = raw_send(server.addr, wire.as_bytes()).await;
    let seen = read_until_closed(&mut stream).await;
    assert_eq!(answers(&seen), want(&[(408, "request_timeout")]));
    assert_eq!(accepted(&server).await, (0, 0));
    server.stop().await;
}

#[tokio::test]
async fn bytes_past_the_declared_length_are_read_as_the_next_request() {
    let server = TestServer::start().await;

    // The first 18 bytes are a whole callback; the rest is not a request line: hyper answers
    // it with its own bare 400 and closes the connection.
    let wire =
        format!("{HEAD}content-length: 18\r\n\r\n{{\"object_ids\":[1]}}{{\"object_ids\":[2]}}");
    let mut stream = raw_send(server.addr, wire.as_bytes()).await;
    let seen = read_until_closed(&mut stream).await;
    assert_eq!(answers(&seen), want(&[(202, "accepted 1"), (400, "")]));
    let (responses, _) = parse_responses(&seen, false);
    assert_eq!(responses[1].header("connection"), Some("close"));

    // A length that cuts the JSON short: the part is judged as it is.
    let wire = format!("{HEAD}content-length: 10\r\n\r\n{{\"object_ids\":[3,4]}}");
    let mut stream = raw_send(server.addr, wire.as_bytes()).await;
    let seen = read_until_closed(&mut stream).await;
    assert_eq!(answers(&seen), want(&[(400, "invalid_json"), (400, "")]));

    assert_eq!(accepted(&server).await, (1, 1), "only id 1 was accepted");
    server.stop().await;
}

#[tokio::test]
async fn conflicting_framing_is_refused_or_resolved_by_the_rfc() {
    let server = TestServer::start().await;

    // Two different lengths: hyper refuses the request (a bare 400) and closes.
    let wire =
        format!("{HEAD}content-length: 18\r\ncontent-length: 19\r\n\r\n{{\"object_ids\":[1]}} ");
    let mut stream = raw_send(server.addr, wire.as_bytes()).await;
    let seen = read_until_closed(&mut stream).await;
    assert_eq!(answers(&seen), want(&[(400, "")]));

    // A chunk-size line that is not hex: the body cannot be read.
    let wire = format!(
        "{HEAD}transfer-encoding: chunked\r\n\r\nzz\r\n{{\"object_ids\":[1]}}\r\n0\r\n\r\n"
    );
    let mut stream = raw_send(server.addr, wire.as_bytes()).await;
    let seen = read_until_closed(&mut stream).await;
    assert_eq!(answers(&seen), want(&[(400, "bad_request")]));

    // Both a length and chunked: chunked wins (RFC 9112 §6.3) and the connection closes
    // after the answer, so no byte the length would have left over can smuggle a request.
    let wire = format!(
        "{HEAD}content-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
         12\r\n{{\"object_ids\":[5]}}\r\n0\r\n\r\n"
    );
    let mut stream = raw_send(server.addr, wire.as_bytes()).await;
    let seen = read_until_closed(&mut stream).await;
    assert_eq!(answers(&seen), want(&[(202, "accepted 1")]));
    let (responses, _) = parse_responses(&seen, false);
    assert_eq!(responses[0].header("connection"), Some("close"));

    assert_eq!(accepted(&server).await, (1, 1));
    server.stop().await;
}

/// A request head with one `x-filler` header of `filler` bytes and a one-id callback.
fn with_filler(filler: usize, id: u64) -> String {
    let body = format!("{{\"object_ids\":[{id}]}}");
    format!(
        "{HEAD}x-filler: {}\r\ncontent-length: {}\r\n\r\n{body}",
        "a".repeat(filler),
        body.len()
    )
}

#[tokio::test]
async fn oversized_header_fields_are_answered_431_and_not_accepted() {
    let server = TestServer::start().await;

    // Under the 32 KiB limit: served as usual.
    let mut stream = raw_send(server.addr, with_filler(30 * 1024, 1).as_bytes()).await;
    stream.shutdown().await.unwrap();
    let seen = read_until_closed(&mut stream).await;
    assert_eq!(answers(&seen), want(&[(202, "accepted 1")]));

    // Over it, within what the connection buffers: the envelope, then the connection closes.
    let mut stream = raw_send(server.addr, with_filler(40 * 1024, 2).as_bytes()).await;
    let seen = read_until_closed(&mut stream).await;
    assert_eq!(answers(&seen), want(&[(431, "headers_too_large")]));
    let (responses, _) = parse_responses(&seen, false);
    assert_eq!(responses[0].header("connection"), Some("close"));
    let message = String::from_utf8_lossy(&responses[0].body).into_owned();
    assert!(message.contains("32768"), "it names the limit: {message}");

    // 200 KB, past the connection's buffer: hyper's own bare 431, before any routing.
    let mut stream = raw_send(server.addr, with_filler(200 * 1024, 3).as_bytes()).await;
    let seen = read_until_closed(&mut stream).await;
    assert_eq!(answers(&seen), want(&[(431, "")]));

    assert_eq!(accepted(&server).await, (1, 1), "only id 1 was accepted");
    server.stop().await;
}

#[tokio::test]
async fn oversized_header_fields_over_http2_are_refused_and_not_accepted() {
    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let server = TestServer::start().await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_max_header_list_size(1024 * 1024)
        .build_http::<Full<Bytes>>();
    let post = |filler: usize, id: u64| {
        http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("http://{}/callback", server.addr))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-filler", "a".repeat(filler))
            .body(Full::new(Bytes::from(format!("{{\"object_ids\":[{id}]}}"))))
            .unwrap()
    };

    let answer = within("30 KiB of headers", client.request(post(30 * 1024, 1)))
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);

    let answer = within("40 KiB of headers", client.request(post(40 * 1024, 2)))
        .await
        .unwrap();
    assert_eq!(answer.status(), 431);
    let body = within("the 431's body", answer.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(envelope["error"], "headers_too_large");

    // Past the header list size the server announces: the HTTP/2 layer itself closes the
    // connection (GOAWAY, ENHANCE_YOUR_CALM) before the request reaches any handler.
    let refused = within("200 KB of headers", client.request(post(200 * 1024, 3))).await;
    let error = refused.expect_err("200 KB of headers were answered");
    assert!(format!("{error:?}").contains("GoAway"), "{error:?}");

    assert_eq!(accepted(&server).await, (1, 1), "only id 1 was accepted");
    server.stop().await;
}
