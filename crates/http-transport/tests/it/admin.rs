//! The admin listener: `/stats`, `/failures`, `/metrics`, unknown routes.

use domain::FetchError;
use http::StatusCode;

use crate::support::{METRICS_TEXT, TestServer, within};

#[tokio::test]
async fn failures_and_stats_are_reported() {
    let server = TestServer::start().await;
    server.source.set_rule(|id| {
        if id.get() == 7 {
            Err(FetchError::Status(500))
        } else {
            Ok(true)
        }
    });
    assert_eq!(
        server.callback(r#"{"object_ids":[7]}"#).await.status,
        StatusCode::ACCEPTED
    );

    let failures = within("the failure is recorded", async {
        loop {
            let reply = server.admin_get("/failures").await;
            assert_eq!(reply.status, StatusCode::OK);
            if !reply.json["failures"].as_array().unwrap().is_empty() {
                break reply.json;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let failure = &failures["failures"][0];
    assert_eq!(failure["id"], 7);
    assert_eq!(failure["code"], "status");
    assert!(failure["reason"].as_str().unwrap().contains("500"));
    let at = failure["at"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{at}");

    let stats = server.admin_get("/stats").await;
    assert_eq!(stats.status, StatusCode::OK);
    assert_eq!(stats.json["accepted_callbacks"], 1);
    assert_eq!(stats.json["failed"], 1);
    for counter in [
        "accepted_ids",
        "fetches_started",
        "online",
        "offline",
        "stored",
        "store_batches",
        "pending_ids",
    ] {
        assert!(stats.json[counter].is_u64(), "{counter}: {stats:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_admin_listener_has_only_admin_routes() {
    let server = TestServer::start().await;
    server
        .admin_get("/nope")
        .await
        .assert_error(404, "not_found");
    server
        .admin_get("/objects")
        .await
        .assert_error(404, "not_found");
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_rendered_as_prometheus_text() {
    let server = TestServer::start().await;
    let (status, headers, text) = server.admin_get_text("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let content_type = headers[http::header::CONTENT_TYPE].to_str().unwrap();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert_eq!(text, METRICS_TEXT);
    server
        .admin_get("/metrics/x")
        .await
        .assert_error(404, "not_found");
    server.stop().await;
}
