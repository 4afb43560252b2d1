//! `HttpObjectSource` against a scripted fake upstream on 127.0.0.1.

mod support;

use std::time::Duration;

use domain::{FetchError, ObjectId, ObjectSource, ObjectStatus};
use support::{FakeUpstream, Reply, refused_base_url};
use tokio::time::Instant;
use upstream_client::{HttpObjectSource, MAX_BODY_BYTES, MIN_RETRY_BUDGET, UpstreamConfig};

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
        max_requests_per_second: 0,
        tls_ca_file: None,
        tls_identity: None,
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
    let result = source.fetch(id(4)).await;
    let elapsed = started.elapsed();
    // The last attempt had the full timeout or only what was left of the deadline.
    let Err(FetchError::Timeout(last_timeout)) = result else {
        panic!("expected a timeout, got {result:?}");
    };
    assert!(
        !last_timeout.is_zero() && last_timeout <= request_timeout,
        "the last attempt had {last_timeout:?}"
    );
    let attempts = upstream.received().len();
    assert!(attempts >= 3, "only {attempts} attempts");
    // It kept retrying until too little was left (at most the budget and the longest
    // jittered pause short of the deadline)...
    let max_pause = 2 * 50 * MS;
    assert!(
        elapsed + MIN_RETRY_BUDGET + max_pause >= deadline,
        "gave up after {elapsed:?}"
    );
    // ...and no attempt ran past the deadline, though each answer would take 5 s.
    assert!(
        elapsed < deadline + Duration::from_secs(1),
        "took {elapsed:?}"
    );
    upstream.stop().await;
}

#[tokio::test]
async fn a_retry_after_a_slow_first_attempt_gets_only_the_time_left() {
    let upstream = FakeUpstream::start([]).await;
    upstream
        .answer_all_with(Reply::ok(r#"{"id":4,"online":true}"#).delayed(Duration::from_secs(5)));
    let request_timeout = 1000 * MS;
    let deadline = 1500 * MS;
    let source = source(UpstreamConfig {
        request_timeout,
        retry_deadline: deadline,
        ..config(upstream.base_url())
    });
    let started = Instant::now();
    let result = source.fetch(id(4)).await;
    let elapsed = started.elapsed();
    let received = upstream.received();
    assert_eq!(received.len(), 2, "{received:?}");
    // The first attempt had its full second; the retry came only after it timed out.
    let gap = received[1].at - received[0].at;
    assert!(gap >= request_timeout - 50 * MS, "retried after {gap:?}");
    // The retry had what was left of the deadline, not another full second.
    let Err(FetchError::Timeout(retry_timeout)) = result else {
        panic!("expected a timeout, got {result:?}");
    };
    assert!(
        retry_timeout <= deadline - request_timeout,
        "the retry had {retry_timeout:?}"
    );
    assert!(
        retry_timeout >= MIN_RETRY_BUDGET / 2,
        "the retry had {retry_timeout:?}"
    );
    // So the fetch ended at the deadline, well before a second full timeout would.
    assert!(elapsed >= deadline, "gave up after {elapsed:?}");
    assert!(elapsed < 2 * request_timeout, "took {elapsed:?}");
    upstream.stop().await;
}

#[tokio::test]
async fn a_first_attempt_longer_than_the_deadline_gets_its_full_timeout_and_no_retry() {
    let upstream = FakeUpstream::start([]).await;
    upstream
        .answer_all_with(Reply::ok(r#"{"id":4,"online":true}"#).delayed(Duration::from_secs(5)));
    let request_timeout = 600 * MS;
    let source = source(UpstreamConfig {
        request_timeout,
        retry_deadline: 300 * MS,
        ..config(upstream.base_url())
    });
    let started = Instant::now();
    assert_eq!(
        source.fetch(id(4)).await,
        Err(FetchError::Timeout(request_timeout))
    );
    assert!(started.elapsed() >= request_timeout);
    assert_eq!(upstream.received().len(), 1);
    upstream.stop().await;
}

#[tokio::test]
async fn a_slow_answer_within_the_request_timeout_is_waited_for_past_the_deadline() {
    let upstream =
        FakeUpstream::start([Reply::ok(r#"{"id":4,"online":true}"#).delayed(600 * MS)]).await;
    let source = source(UpstreamConfig {
        request_timeout: Duration::from_secs(2),
        retry_deadline: 300 * MS,
        ..config(upstream.base_url())
    });
    assert!(source.fetch(id(4)).await.is_ok());
    assert_eq!(upstream.received().len(), 1);
    upstream.stop().await;
}

#[tokio::test]
async fn a_refused_connection_is_unreachable_once_the_deadline_passes() {
    let deadline = 500 * MS;
    let source = source(UpstreamConfig {
        request_timeout: 100 * MS,
        retry_deadline: deadline,
        ..config(refused_base_url().await)
    });
    let started = Instant::now();
    let result = source.fetch(id(4)).await;
    let Err(FetchError::Unreachable(cause)) = &result else {
        panic!("expected unreachable, got {result:?}");
    };
    assert!(cause.to_lowercase().contains("refused"), "{cause}");
    let elapsed = started.elapsed();
    // It kept trying until too little was left, not just once...
    let max_pause = 2 * 50 * MS;
    assert!(
        elapsed + MIN_RETRY_BUDGET + max_pause >= deadline,
        "gave up after {elapsed:?}"
    );
    // ...and stopped by the deadline.
    assert!(
        elapsed < deadline + Duration::from_secs(1),
        "took {elapsed:?}"
    );
}

/// The service's defaults: a request timeout longer than the retry deadline.
fn service_defaults(base_url: String) -> UpstreamConfig {
    UpstreamConfig {
        base_url,
        request_timeout: Duration::from_secs(5),
        retry_deadline: Duration::from_secs(2),
        ..UpstreamConfig::default()
    }
}

#[tokio::test]
async fn with_a_5s_timeout_and_a_2s_deadline_a_dropped_connection_is_retried_several_times() {
    let upstream = FakeUpstream::start([]).await;
    upstream.answer_all_with(Reply::Close);
    let config = service_defaults(upstream.base_url());
    let deadline = config.retry_deadline;
    let source = source(config);
    let started = Instant::now();
    let result = source.fetch(id(4)).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Err(FetchError::Unreachable(_))),
        "{result:?}"
    );
    // Pauses of 100-200, 200-400, 400-800 ms: at least four attempts fit in 2 s.
    let attempts = upstream.received().len();
    assert!(attempts >= 4, "only {attempts} attempts in {elapsed:?}");
    assert!(elapsed >= 700 * MS, "gave up after {elapsed:?}");
    assert!(
        elapsed < deadline + Duration::from_secs(1),
        "took {elapsed:?}"
    );
    upstream.stop().await;
}

#[tokio::test]
async fn with_a_5s_timeout_and_a_2s_deadline_a_refused_connection_is_retried_within_2s() {
    let source = source(service_defaults(refused_base_url().await));
    let started = Instant::now();
    let result = source.fetch(id(4)).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Err(FetchError::Unreachable(_))),
        "{result:?}"
    );
    // A refusal comes back at once: only the pauses between retries take time, at least
    // 100 + 200 + 400 ms before the fourth attempt.
    assert!(elapsed >= 700 * MS, "gave up after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
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

#[tokio::test]
async fn requests_are_spaced_by_the_rate_limit() {
    let upstream = FakeUpstream::start([]).await;
    let source = source(UpstreamConfig {
        max_requests_per_second: 20,
        ..config(upstream.base_url())
    });
    let started = Instant::now();
    for raw in 0..5 {
        assert!(source.fetch(id(raw)).await.is_ok());
    }
    let received = upstream.received();
    assert_eq!(received.len(), 5);
    // Slots 50 ms apart: the fifth request was not sent before 200 ms.
    let last = received[4].at - started;
    assert!(last >= 200 * MS, "the fifth request arrived after {last:?}");
    upstream.stop().await;
}

#[tokio::test]
async fn retries_and_clones_share_one_rate_limit() {
    let upstream = FakeUpstream::start([Reply::status(500, "{}")]).await;
    let source = source(UpstreamConfig {
        max_requests_per_second: 10,
        ..config(upstream.base_url())
    });
    let clone = source.clone();
    let started = Instant::now();
    // id 1 fails once and is retried; id 2 goes through the clone at the same time.
    let (first, second) = tokio::join!(source.fetch(id(1)), clone.fetch(id(2)));
    assert!(first.is_ok(), "{first:?}");
    assert!(second.is_ok(), "{second:?}");
    let received = upstream.received();
    assert_eq!(received.len(), 3, "{received:?}");
    // Three requests in three slots 100 ms apart, though the backoff alone would have
    // retried after 10-20 ms.
    let last = received[2].at - started;
    assert!(last >= 200 * MS, "the third request arrived after {last:?}");
    upstream.stop().await;
}

#[tokio::test]
async fn the_wait_for_a_slot_is_not_part_of_the_request_timeout() {
    let upstream = FakeUpstream::start([]).await;
    let request_timeout = 300 * MS;
    let source = source(UpstreamConfig {
        request_timeout,
        max_requests_per_second: 4,
        ..config(upstream.base_url())
    });
    let started = Instant::now();
    let fetches: Vec<_> = (0..4)
        .map(|raw| {
            let source = source.clone();
            tokio::spawn(async move { source.fetch(id(raw)).await })
        })
        .collect();
    for fetch in fetches {
        let result = fetch.await.unwrap();
        assert!(result.is_ok(), "{result:?}");
    }
    // The last one waited 750 ms for its slot, longer than the request timeout, and
    // still got its answer on the first attempt.
    assert!(started.elapsed() > request_timeout);
    assert_eq!(upstream.received().len(), 4);
    upstream.stop().await;
}

#[tokio::test]
async fn a_retry_whose_slot_comes_after_the_deadline_is_not_made() {
    let upstream = FakeUpstream::start([Reply::status(500, "{}")]).await;
    let source = source(UpstreamConfig {
        retry_deadline: 500 * MS,
        max_requests_per_second: 1,
        ..config(upstream.base_url())
    });
    let started = Instant::now();
    // The retry's slot would be 1 s after the first request, past the 500 ms deadline.
    assert_eq!(source.fetch(id(4)).await, Err(FetchError::Status(500)));
    assert_eq!(upstream.received().len(), 1);
    // It gave up at once instead of waiting for the slot.
    assert!(started.elapsed() < Duration::from_secs(1));
    upstream.stop().await;
}
