//! `HttpObjectSource` against a scripted fake upstream on 127.0.0.1.

mod support;

use std::time::Duration;

use domain::{FetchError, ObjectId, ObjectSource, ObjectStatus};
use support::{FakeUpstream, Reply, refused_base_url};
use tokio::time::Instant;
use upstream_client::{HttpObjectSource, MAX_BODY_BYTES, UpstreamConfig};

const MS: Duration = Duration::from_millis(1);

fn id(raw: i64) -> ObjectId {
    ObjectId::new(raw).unwrap()
}

/// Short timeouts and pauses so the retry tests take well under a second or two.
fn config(base_url: String) -> UpstreamConfig {
    UpstreamConfig {
        base_url,
        request_timeout: 500 * MS,
        connect_timeout: 200 * MS,
        retry_deadline: 2000 * MS,
        retry_min_delay: 10 * MS,
        retry_max_delay: 50 * MS,
        max_idle_per_host: 8,
    }
}

fn source(config: UpstreamConfig) -> HttpObjectSource {
    HttpObjectSource::new(config).unwrap()
}

#[tokio::test]
async fn online_and_offline_answers() {
    let upstream = FakeUpstream::start([
        Reply::ok(r#"{"id":4,"online":true}"#),
        Reply::ok(r#"{"online":false,"id":7,"note":"ignored"}"#),
    ])
    .await;
    let source = source(config(upstream.base_url()));

    assert_eq!(
        source.fetch(id(4)).await,
        Ok(ObjectStatus {
            id: id(4),
            online: true
        })
    );
    assert_eq!(
        source.fetch(id(7)).await,
        Ok(ObjectStatus {
            id: id(7),
            online: false
        })
    );
    let paths: Vec<_> = upstream
        .received()
        .into_iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(paths, ["GET /objects/4", "GET /objects/7"]);
    upstream.stop().await;
}

#[tokio::test]
async fn a_base_url_with_a_path_and_a_trailing_slash_is_joined_cleanly() {
    let upstream = FakeUpstream::start([]).await;
    let source = source(config(format!("{}/api/", upstream.base_url())));
    // The fake echoes only /objects/N, so 404 here proves the prefix is kept...
    assert_eq!(source.fetch(id(2)).await, Err(FetchError::Status(404)));
    // ...and it arrived as /api/objects/2, with no doubled slash.
    assert_eq!(upstream.received()[0].path, "/api/objects/2");
    upstream.stop().await;
}

#[tokio::test]
async fn an_id_mismatch_is_an_error_and_not_retried() {
    let upstream = FakeUpstream::start([Reply::ok(r#"{"id":5,"online":true}"#)]).await;
    let source = source(config(upstream.base_url()));
    assert_eq!(
        source.fetch(id(4)).await,
        Err(FetchError::IdMismatch {
            asked: id(4),
            got: 5
        })
    );
    assert_eq!(upstream.received().len(), 1);
    upstream.stop().await;
}

#[tokio::test]
async fn a_malformed_body_is_an_error_and_not_retried() {
    for body in [
        "not json at all",
        r#"{"id":4}"#,
        r#"{"id":4,"online":"yes"}"#,
        r#"{"id":"4","online":true}"#,
    ] {
        let upstream = FakeUpstream::start([Reply::ok(body)]).await;
        let source = source(config(upstream.base_url()));
        let result = source.fetch(id(4)).await;
        assert!(
            matches!(result, Err(FetchError::Malformed(_))),
            "{body}: {result:?}"
        );
        assert_eq!(upstream.received().len(), 1, "{body} was retried");
        upstream.stop().await;
    }
}

#[tokio::test]
async fn an_oversized_body_is_rejected_with_or_without_a_length() {
    let huge = format!(
        r#"{{"id":4,"online":true,"pad":"{}"}}"#,
        "x".repeat(MAX_BODY_BYTES)
    );
    for reply in [
        Reply::ok(huge.clone()),
        Reply::ok(huge.clone()).until_close(),
    ] {
        let upstream = FakeUpstream::start([reply]).await;
        let source = source(config(upstream.base_url()));
        let result = source.fetch(id(4)).await;
        let Err(FetchError::Malformed(message)) = &result else {
            panic!("expected malformed, got {result:?}");
        };
        assert!(message.contains("limit"), "{message}");
        assert!(message.len() < 200, "the body leaked into the message");
        assert_eq!(upstream.received().len(), 1);
        upstream.stop().await;
    }
}

#[tokio::test]
async fn not_found_is_returned_at_once() {
    let upstream = FakeUpstream::start([Reply::status(404, r#"{"error":"not_found"}"#)]).await;
    let source = source(config(upstream.base_url()));
    assert_eq!(source.fetch(id(4)).await, Err(FetchError::Status(404)));
    assert_eq!(upstream.received().len(), 1);
    upstream.stop().await;
}

#[tokio::test]
async fn server_errors_are_retried_until_an_answer() {
    let upstream = FakeUpstream::start([
        Reply::status(500, "{}"),
        Reply::status(500, "{}"),
        Reply::ok(r#"{"id":4,"online":true}"#),
    ])
    .await;
    let source = source(config(upstream.base_url()));
    assert_eq!(
        source.fetch(id(4)).await,
        Ok(ObjectStatus {
            id: id(4),
            online: true
        })
    );
    assert_eq!(upstream.received().len(), 3);
    upstream.stop().await;
}

#[tokio::test]
async fn too_many_requests_is_retried() {
    let upstream = FakeUpstream::start([
        Reply::status(429, r#"{"error":"slow down"}"#),
        Reply::ok(r#"{"id":4,"online":false}"#),
    ])
    .await;
    let source = source(config(upstream.base_url()));
    assert_eq!(
        source.fetch(id(4)).await,
        Ok(ObjectStatus {
            id: id(4),
            online: false
        })
    );
    assert_eq!(upstream.received().len(), 2);
    upstream.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured_within_the_deadline() {
    let upstream = FakeUpstream::start([
        Reply::status(503, "{}").header("retry-after", "1"),
        Reply::ok(r#"{"id":4,"online":true}"#),
    ])
    .await;
    let source = source(UpstreamConfig {
        retry_deadline: Duration::from_secs(3),
        ..config(upstream.base_url())
    });
    assert!(source.fetch(id(4)).await.is_ok());
    let received = upstream.received();
    assert_eq!(received.len(), 2);
    let gap = received[1].at - received[0].at;
    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}");
    upstream.stop().await;
}

#[tokio::test]
async fn retry_after_past_the_deadline_gives_up_at_once() {
    let upstream =
        FakeUpstream::start([Reply::status(429, "{}").header("retry-after", "60")]).await;
    let source = source(config(upstream.base_url()));
    let started = Instant::now();
    assert_eq!(source.fetch(id(4)).await, Err(FetchError::Status(429)));
    assert_eq!(upstream.received().len(), 1);
    assert!(started.elapsed() < Duration::from_secs(1));
    upstream.stop().await;
}

#[tokio::test]
async fn a_slow_upstream_is_retried_then_times_out_by_the_deadline() {
    let upstream = FakeUpstream::start([]).await;
    upstream
        .answer_all_with(Reply::ok(r#"{"id":4,"online":true}"#).delayed(Duration::from_secs(5)));
    let request_timeout = 150 * MS;
    let deadline = 800 * MS;
    let source = source(UpstreamConfig {
        request_timeout,
        retry_deadline: deadline,
        ..config(upstream.base_url())
    });
    let started = Instant::now();
    assert_eq!(
        source.fetch(id(4)).await,
        Err(FetchError::Timeout(request_timeout))
    );
    let elapsed = started.elapsed();
    let attempts = upstream.received().len();
    assert!(attempts >= 3, "only {attempts} attempts");
    // No attempt is started that could not finish by the deadline (plus scheduling slack).
    assert!(elapsed <= deadline + 300 * MS, "took {elapsed:?}");
    upstream.stop().await;
}

#[tokio::test]
async fn a_refused_connection_is_unreachable_once_the_deadline_passes() {
    let source = source(UpstreamConfig {
        request_timeout: 100 * MS,
        retry_deadline: 500 * MS,
        ..config(refused_base_url().await)
    });
    let started = Instant::now();
    let result = source.fetch(id(4)).await;
    let Err(FetchError::Unreachable(cause)) = &result else {
        panic!("expected unreachable, got {result:?}");
    };
    assert!(cause.to_lowercase().contains("refused"), "{cause}");
    let elapsed = started.elapsed();
    // It kept trying for most of the deadline, not just once.
    assert!(elapsed >= 150 * MS, "gave up after {elapsed:?}");
    assert!(elapsed <= 800 * MS, "took {elapsed:?}");
}

#[tokio::test]
async fn a_connection_closed_before_the_answer_is_retried() {
    let upstream =
        FakeUpstream::start([Reply::Close, Reply::ok(r#"{"id":4,"online":true}"#)]).await;
    let source = source(config(upstream.base_url()));
    assert!(source.fetch(id(4)).await.is_ok());
    assert_eq!(upstream.received().len(), 2);
    upstream.stop().await;
}

#[tokio::test]
async fn a_connection_closed_every_time_ends_unreachable() {
    let upstream = FakeUpstream::start([]).await;
    upstream.answer_all_with(Reply::Close);
    let source = source(UpstreamConfig {
        request_timeout: 100 * MS,
        retry_deadline: 400 * MS,
        ..config(upstream.base_url())
    });
    let result = source.fetch(id(4)).await;
    assert!(
        matches!(result, Err(FetchError::Unreachable(_))),
        "{result:?}"
    );
    assert!(upstream.received().len() >= 2);
    upstream.stop().await;
}

#[tokio::test]
async fn connections_are_reused() {
    let upstream = FakeUpstream::start([]).await;
    let source = source(config(upstream.base_url()));
    for raw in 0..5 {
        let status = source.fetch(id(raw)).await.unwrap();
        assert_eq!(status.online, raw % 2 == 0);
    }
    let received = upstream.received();
    assert_eq!(received.len(), 5);
    assert_eq!(upstream.connections(), 1, "{received:?}");
    assert!(received.iter().all(|r| r.connection == 0));
    upstream.stop().await;
}

#[tokio::test]
async fn small_error_answers_do_not_cost_the_connection() {
    let upstream = FakeUpstream::start([
        Reply::status(404, r#"{"error":"not_found"}"#),
        Reply::status(500, r#"{"error":"boom"}"#),
    ])
    .await;
    let source = source(config(upstream.base_url()));
    assert_eq!(source.fetch(id(1)).await, Err(FetchError::Status(404)));
    // 500 then the echo's 200, on the same connection.
    assert!(source.fetch(id(2)).await.is_ok());
    assert_eq!(upstream.received().len(), 3);
    assert_eq!(upstream.connections(), 1);
    upstream.stop().await;
}
