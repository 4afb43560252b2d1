//! `GET /objects`, `GET /objects/{id}`, health, and what store faults look like.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat};
use domain::Timestamp;
use http::{StatusCode, header};
use serde_json::Value;

use crate::support::TestServer;

fn rfc3339(ts: Timestamp) -> String {
    DateTime::from_timestamp_micros(ts.as_unix_micros())
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn ids(page: &Value) -> Vec<i64> {
    page["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn one_object_hit_miss_expired_and_bad_id() {
    let server = TestServer::start().await;
    let stored = server.seed(4).await;
    let now = Timestamp::from_system_time(SystemTime::now());
    server
        .seed_at(
            6,
            now.saturating_add(Duration::ZERO),
            Timestamp::from_unix_micros(now.as_unix_micros() - 1_000_000),
        )
        .await;

    let hit = server.get("/objects/4").await;
    assert_eq!(hit.status, StatusCode::OK, "{hit:?}");
    assert_eq!(hit.headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(hit.json["id"], 4);
    assert_eq!(hit.json["last_seen"], rfc3339(stored.last_seen));
    assert_eq!(hit.json["expires_at"], rfc3339(stored.expires_at));
    let last_seen = hit.json["last_seen"].as_str().unwrap();
    assert!(last_seen.ends_with('Z') && last_seen.len() == "2026-11-25T12:00:00.123456Z".len());

    let miss = server.get("/objects/5").await;
    assert_eq!(
        miss.assert_error(404, "not_found"),
        "object 5 is not stored"
    );

    let expired = server.get("/objects/6").await;
    assert_eq!(
        expired.assert_error(404, "not_found"),
        "object 6 is not stored"
    );

    for bad in ["abc", "-1", "9223372036854775808", "1.0"] {
        let reply = server.get(&format!("/objects/{bad}")).await;
        let message = reply.assert_error(422, "invalid_object_id");
        assert!(message.contains(bad), "{bad}: {message}");
    }
    server.stop().await;
}

#[tokio::test]
async fn objects_are_listed_in_pages() {
    let server = TestServer::start().await;
    for id in [0, 1, 2, 3, 4] {
        server.seed(id).await;
    }
    let first = server.get("/objects?limit=2").await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(ids(&first.json), vec![0, 1]);
    assert_eq!(first.json["next_after"], 1);
    let object = &first.json["objects"][0];
    assert!(object["last_seen"].is_string() && object["expires_at"].is_string());

    let second = server.get("/objects?after=1&limit=2").await;
    assert_eq!(ids(&second.json), vec![2, 3]);
    assert_eq!(second.json["next_after"], 3);

    let last = server.get("/objects?after=3&limit=2").await;
    assert_eq!(ids(&last.json), vec![4]);
    assert_eq!(last.json["next_after"], Value::Null);

    let all = server.get("/objects").await;
    assert_eq!(ids(&all.json), vec![0, 1, 2, 3, 4]);
    assert_eq!(all.json["next_after"], Value::Null);
    server.stop().await;
}

#[tokio::test]
async fn bad_query_values_are_invalid_query_naming_the_parameter() {
    let server = TestServer::start().await;
    for (query, name) in [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=abc", "limit"),
        ("after=-1", "after"),
        ("after=x", "after"),
    ] {
        let reply = server.get(&format!("/objects?{query}")).await;
        let message = reply.assert_error(400, "invalid_query");
        assert!(message.contains(&format!("`{name}`")), "{query}: {message}");
    }
    assert_eq!(
        server.get("/objects?limit=10000").await.status,
        StatusCode::OK
    );
    server.stop().await;
}

#[tokio::test]
async fn health_reports_the_database() {
    let server = TestServer::start().await;
    let ok = server.get("/").await;
    assert_eq!(ok.status, StatusCode::OK, "{ok:?}");
    assert_eq!(ok.json["status"], "ok");
    assert_eq!(ok.json["components"]["database"]["status"], "ok");
    assert_eq!(ok.json["pipeline"]["accepted_callbacks"], 0);
    assert!(ok.json["pipeline"]["pending_ids"].is_u64());

    server.store.set_unavailable(true);
    let down = server.get("/").await;
    let message = down.assert_error(503, "unavailable");
    assert!(message.starts_with("database unavailable"), "{message}");
    assert!(down.retry_after() >= 1);
    assert_eq!(down.json["status"], "unavailable");
    assert_eq!(down.json["components"]["database"]["status"], "down");
    assert!(down.json["components"]["database"]["error"].is_string());

    server.store.set_unavailable(false);
    assert_eq!(server.get("/").await.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn an_unavailable_store_is_503_with_retry_after() {
    let server = TestServer::start().await;
    server.store.set_unavailable(true);
    for path in ["/objects", "/objects/1"] {
        let reply = server.get(path).await;
        reply.assert_error(503, "unavailable");
        assert!(reply.retry_after() >= 1);
    }
    server.stop().await;
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_and_the_server_keeps_working() {
    let server = TestServer::start().await;
    server.seed(2).await;
    server.store.set_panic_on_read(true);
    for path in ["/objects", "/objects/2"] {
        let reply = server.get(path).await;
        let message = reply.assert_error(500, "internal_error");
        assert!(
            !message.contains("simulated"),
            "the cause stays in the log: {message}"
        );
    }

    server.store.set_panic_on_read(false);
    let reply = server.get("/objects").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(ids(&reply.json), vec![2]);
    server.stop().await;
}
