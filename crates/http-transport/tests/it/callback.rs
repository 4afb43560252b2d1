//! `POST /callback`: acceptance, parse errors, limits, content types, back-pressure.

use std::time::Duration;

use bytes::Bytes;
use domain::PipelineConfig;
use http::{Method, Request, StatusCode, Version, header};
use http_body_util::Full;
use http_transport::HttpConfig;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

use crate::support::{
    Options, TestServer, raw_send, read_response, read_until_closed, request, send,
};

#[tokio::test]
async fn a_valid_callback_is_accepted_with_its_distinct_count() {
    let server = TestServer::start().await;

    let reply = server.callback(r#"{"object_ids":[0,1,2,2]}"#).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(reply.json, json!({ "accepted": 3 }));

    let stats = server.admin_get("/stats").await;
    assert_eq!(stats.json["accepted_callbacks"], 1);
    assert_eq!(stats.json["accepted_ids"], 3);
    server.stop().await;
}

#[tokio::test]
async fn an_empty_list_and_unknown_fields_are_accepted() {
    let server = TestServer::start().await;
    let reply = server.callback(r#"{"object_ids":[]}"#).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.json, json!({ "accepted": 0 }));

    let reply = server
        .callback(r#"{"sent_at":"now","object_ids":[4],"meta":{"x":[1,2]}}"#)
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.json, json!({ "accepted": 1 }));
    server.stop().await;
}

#[tokio::test]
async fn bodies_that_are_not_the_expected_json_are_invalid_json() {
    let server = TestServer::start().await;
    for (body, hint) in [
        (r#"{"object_ids":[1,"#, "line 1 column"),
        ("", "eof"),
        ("[1,2,3]", "expected a json object"),
        ("{}", "missing field `object_ids`"),
        (r#"{"object_ids":"1,2"}"#, "expected an array"),
        (r#"{"object_ids":[1]} {}"#, "trailing characters"),
    ] {
        let reply = server.callback(body).await;
        let message = reply.assert_error(400, "invalid_json");
        assert!(message.to_lowercase().contains(hint), "{body:?}: {message}");
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_ids_are_invalid_object_id_naming_the_element() {
    let server = TestServer::start().await;
    for (body, expected) in [
        (
            r#"{"object_ids":[0,1,-1]}"#,
            "object_ids[2] must be a non-negative integer that fits in i64, got -1",
        ),
        (
            r#"{"object_ids":[1.5]}"#,
            "object_ids[0] must be a non-negative integer that fits in i64, got 1.5",
        ),
        (
            r#"{"object_ids":[7,1e3]}"#,
            "object_ids[1] must be a non-negative integer that fits in i64, got 1000.0",
        ),
        (
            r#"{"object_ids":["3"]}"#,
            r#"object_ids[0] must be a non-negative integer that fits in i64, got the string "3""#,
        ),
        (
            r#"{"object_ids":[1,2,null]}"#,
            "object_ids[2] must be a non-negative integer that fits in i64, got null",
        ),
        (
            r#"{"object_ids":[9223372036854775808]}"#,
            "object_ids[0] must be a non-negative integer that fits in i64, got 9223372036854775808",
        ),
        (
            r#"{"object_ids":[1e30]}"#,
            "object_ids[0] must be a non-negative integer that fits in i64, got 1e30",
        ),
    ] {
        let reply = server.callback(body).await;
        assert_eq!(
            reply.assert_error(422, "invalid_object_id"),
            expected,
            "{body}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn more_ids_than_the_limit_is_payload_too_large() {
    let server = TestServer::start_with(Options {
        http: HttpConfig {
            max_ids: 3,
            ..HttpConfig::default()
        },
        ..Options::default()
    })
    .await;
    assert_eq!(
        server.callback(r#"{"object_ids":[1,2,3]}"#).await.status,
        StatusCode::ACCEPTED
    );
    let reply = server.callback(r#"{"object_ids":[1,2,3,4]}"#).await;
    let message = reply.assert_error(413, "payload_too_large");
    assert!(message.contains('3'), "{message}");
    server.stop().await;
}

fn small_body_limit() -> Options {
    Options {
        http: HttpConfig {
            max_body_bytes: 1024,
            body_read_timeout: Duration::from_millis(200),
            ..HttpConfig::default()
        },
        ..Options::default()
    }
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_before_the_body_is_sent() {
    let server = TestServer::start_with(small_body_limit()).await;
    // Only the head goes out: the answer must not wait for a body that never comes.
    let mut stream = raw_send(
        server.addr,
        b"POST /callback HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: 2000000\r\n\r\n",
    )
    .await;
    let reply = read_response(&mut stream).await;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(reply.json()["error"], "payload_too_large");
    assert!(reply.json()["message"].as_str().unwrap().contains("1024"));
    assert_eq!(reply.header("connection"), Some("close"));
    read_until_closed(&mut stream).await;
    server.stop().await;
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_payload_too_large() {
    let server = TestServer::start_with(small_body_limit()).await;
    let ids = vec!["1"; 700].join(",");
    let body = format!(r#"{{"object_ids":[{ids}]}}"#);
    assert!(body.len() > 1024);
    let mut wire = b"POST /callback HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for chunk in body.as_bytes().chunks(300) {
        wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        wire.extend_from_slice(chunk);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let mut stream = raw_send(server.addr, &wire).await;
    let reply = read_response(&mut stream).await;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(reply.json()["error"], "payload_too_large");
    server.stop().await;
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_a_request_timeout() {
    let server = TestServer::start_with(small_body_limit()).await;
    let mut stream = raw_send(
        server.addr,
        b"POST /callback HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"object_ids\":[",
    )
    .await;
    let reply = read_response(&mut stream).await;
    assert_eq!(reply.status, 408, "{reply:?}");
    assert_eq!(reply.json()["error"], "request_timeout");
    server.stop().await;
}

#[tokio::test]
async fn only_json_content_types_are_accepted() {
    let server = TestServer::start().await;
    let body = r#"{"object_ids":[1]}"#;
    for content_type in [Some("text/plain"), Some("application/xml"), None] {
        let reply = server
            .send(request(Method::POST, "/callback", content_type, body))
            .await;
        reply.assert_error(415, "unsupported_media_type");
    }
    for content_type in ["Application/JSON", "application/json; charset=utf-8"] {
        let reply = server
            .send(request(Method::POST, "/callback", Some(content_type), body))
            .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{content_type}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_full_backlog_is_unavailable_with_retry_after() {
    let server = TestServer::start_with(Options {
        pipeline: PipelineConfig {
            max_pending_ids: 2,
            ..PipelineConfig::default()
        },
        // Fetches outlive the test: the two accepted ids stay pending.
        latency: Duration::from_secs(3600),
        ..Options::default()
    })
    .await;
    assert_eq!(
        server.callback(r#"{"object_ids":[1,2]}"#).await.status,
        StatusCode::ACCEPTED
    );
    let reply = server.callback(r#"{"object_ids":[3]}"#).await;
    reply.assert_error(503, "unavailable");
    assert!(reply.retry_after() >= 1);
    server.stop().await;
}

#[tokio::test]
async fn http2_with_prior_knowledge_works() {
    let server = TestServer::start().await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = Request::builder()
        .method(Method::POST)
        .uri("/callback")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(br#"{"object_ids":[5,5,6]}"#)))
        .unwrap();
    let reply = send(&client, server.addr, req).await;
    assert_eq!(reply.version, Version::HTTP_2);
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.json, json!({ "accepted": 2 }));

    let req = request(Method::GET, "/objects/5", None, "");
    let reply = send(&client, server.addr, req).await;
    assert_eq!(reply.version, Version::HTTP_2);
    reply.assert_error(404, "not_found");
    server.stop().await;
}
