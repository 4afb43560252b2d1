//! `GET /metrics` on the admin listener of the real `callback-service`, after traffic:
//! the Prometheus series the operators read, with the counts the traffic implies.
//!
//! SQLite only: the series do not depend on the backend, and the PostgreSQL pool gauges
//! are not asserted here.

use std::time::Duration;

use serde_json::json;
use tests::scrape::{parse, scrape, value};
use tests::{Backend, Service, Upstream, eventually, http};

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

async fn post(service: &Service, body: &str) -> anyhow::Result<u16> {
    let response = http()
        .post(service.url("/callback"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await?;
    Ok(response.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_traffic_hold_the_named_series_with_their_counts() -> anyhow::Result<()> {
    let upstream = Upstream::start(0, 5).await?;
    let ttl = Duration::from_secs(1);
    let service = Service::start(Backend::Sqlite, &upstream.base_url(), ttl, &[])
        .await?
        .expect("sqlite is always available");

    // Three callbacks naming six distinct ids, four of them even (online), one bad body,
    // one unknown path.
    for ids in [json!([0, 1, 2]), json!([3, 4]), json!([6])] {
        let body = json!({ "object_ids": ids }).to_string();
        assert_eq!(post(&service, &body).await?, 202, "{body}");
    }
    assert_eq!(post(&service, "{not json").await?, 400);
    let status = http()
        .get(service.url("/no/such/path"))
        .send()
        .await?
        .status();
    assert_eq!(status, 404);

    // Every fetch finished and every online row expired and was deleted.
    let samples = eventually(WAIT, POLL, || async {
        let (_, text) = scrape(&service).await?;
        let samples = parse(&text)?;
        let done = value(&samples, "fetches_total", &[("outcome", "online")]) == Some(4.0)
            && value(&samples, "fetches_total", &[("outcome", "offline")]) == Some(2.0)
            && value(&samples, "expired_rows_deleted_total", &[]) == Some(4.0);
        Ok(done.then_some(samples))
    })
    .await?;

    let count = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
    assert_eq!(count("callbacks_accepted_total", &[]), Some(3.0));
    assert_eq!(count("ids_accepted_total", &[]), Some(6.0));
    let commits = count("inbox_group_commits_total", &[]).unwrap_or_default();
    assert!((1.0..=3.0).contains(&commits), "group commits: {commits}");
    assert_eq!(
        count("fetches_total", &[("outcome", "failed")]),
        Some(0.0),
        "registered at start, never incremented"
    );
    assert_eq!(
        count("upstream_fetch_duration_seconds_count", &[]),
        Some(6.0)
    );
    assert_eq!(count("fetches_in_flight", &[]), Some(0.0));
    let settled = count("store_batch_size_sum", &[]).unwrap_or_default();
    assert_eq!(settled, 6.0, "every outcome settled once");
    assert!(count("store_batch_duration_seconds_count", &[]).unwrap_or_default() >= 1.0);
    assert!(count("expiry_lateness_seconds_count", &[]).unwrap_or_default() >= 1.0);
    assert_eq!(count("upstream_retries_total", &[]), Some(0.0));
    for reason in ["missing", "invalid", "expired", "replayed"] {
        assert_eq!(
            count("auth_rejections_total", &[("reason", reason)]),
            Some(0.0),
            "registered at start; auth is off, so never incremented"
        );
    }
    // The SQLite pool reports its connections too (the sweeper or the backlog monitor may
    // hold one at the moment of the scrape).
    let in_use = count("db_pool_connections", &[("state", "in_use")]).unwrap_or(-1.0);
    let idle = count("db_pool_connections", &[("state", "idle")]).unwrap_or(-1.0);
    assert!(
        in_use >= 0.0 && idle >= 0.0 && in_use + idle >= 1.0,
        "{in_use} {idle}"
    );
    assert!(count("db_pool_waiting", &[]).is_some());

    let callback = [("route", "/callback"), ("method", "POST")];
    assert_eq!(
        count(
            "http_requests_total",
            &[callback[0], callback[1], ("status", "202")]
        ),
        Some(3.0)
    );
    assert_eq!(
        count(
            "http_requests_total",
            &[callback[0], callback[1], ("status", "400")]
        ),
        Some(1.0)
    );
    assert_eq!(
        count(
            "http_requests_total",
            &[("route", "unmatched"), ("method", "GET"), ("status", "404")]
        ),
        Some(1.0),
        "an unknown path is counted under `unmatched`, never under its raw path"
    );
    assert_eq!(
        count("http_request_duration_seconds_count", &callback),
        Some(4.0)
    );
    assert!(
        count(
            "http_request_duration_seconds_bucket",
            &[callback[0], callback[1], ("le", "+Inf")]
        ) == Some(4.0),
        "request latency is a histogram with buckets"
    );
    let raw_paths: Vec<_> = samples
        .keys()
        .filter(|(_, labels)| {
            labels
                .iter()
                .any(|(k, v)| k == "route" && (v.contains("no/such") || v == "/metrics"))
        })
        .collect();
    assert!(
        raw_paths.is_empty(),
        "raw paths or admin routes in the series: {raw_paths:?}"
    );

    // The backlog gauges are set by the monitor, which reads the inbox every second.
    eventually(WAIT, POLL, || async {
        let (_, text) = scrape(&service).await?;
        let samples = parse(&text)?;
        let idle = value(&samples, "inbox_backlog_ids", &[]) == Some(0.0)
            && value(&samples, "inbox_oldest_pending_seconds", &[]) == Some(0.0);
        Ok(idle.then_some(()))
    })
    .await?;

    let (content_type, text) = scrape(&service).await?;
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    for help in [
        "# HELP callbacks_accepted_total ",
        "# HELP auth_rejections_total ",
        "# HELP http_request_duration_seconds ",
        "# TYPE http_request_duration_seconds histogram",
        "# TYPE upstream_fetch_duration_seconds histogram",
        "# TYPE store_batch_size histogram",
        "# TYPE inbox_backlog_ids gauge",
    ] {
        assert!(text.contains(help), "missing {help:?} in:\n{text}");
    }
    Ok(())
}
