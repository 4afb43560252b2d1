//! End-to-end: the real `callback-service` and `client-service` binaries, over HTTP only,
//! on loopback ports, with a temporary SQLite file and a fast upstream.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use tests::{Service, Upstream, eventually, http, now_micros, parse_rfc3339_micros};

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(10);

async fn post_callback(service: &Service, body: &Value) -> anyhow::Result<(u16, Value)> {
    let response = http()
        .post(service.url("/callback"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

async fn get_json(url: &str) -> anyhow::Result<(u16, Value)> {
    let response = http().get(url).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

async fn stored_ids(service: &Service) -> anyhow::Result<BTreeSet<i64>> {
    let (status, body) = get_json(&service.url("/objects?limit=10000")).await?;
    anyhow::ensure!(status == 200, "GET /objects answered {status}: {body}");
    Ok(body["objects"]
        .as_array()
        .map(|objects| objects.iter().filter_map(|o| o["id"].as_i64()).collect())
        .unwrap_or_default())
}

/// Waits until the pipeline has nothing pending, has fetched at least `fetches` ids and
/// has written at least `stored` objects.
async fn wait_idle(service: &Service, fetches: u64, stored: u64) -> anyhow::Result<Value> {
    eventually(WAIT, POLL, || async {
        let (_, stats) = get_json(&service.admin_url("/stats")).await?;
        let count = |key: &str| stats[key].as_u64().unwrap_or(0);
        let idle = stats["pending_ids"] == 0
            && count("fetches_started") >= fetches
            && count("stored") >= stored;
        Ok(idle.then_some(stats))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn even_ids_are_stored_with_a_fresh_last_seen_and_odd_ids_never() -> anyhow::Result<()> {
    let upstream = Upstream::start(0, 5).await?;
    let ttl = Duration::from_secs(60);
    let service = Service::start(&upstream.base_url(), ttl, &[]).await?;

    let before = now_micros();
    let (status, body) =
        post_callback(&service, &json!({"object_ids": [0, 1, 2, 2, 3, 4]})).await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 5, "duplicates count once: {body}");

    let stats = wait_idle(&service, 5, 3).await?;
    assert_eq!(stats["online"], 3, "{stats}");
    assert_eq!(stats["offline"], 2, "{stats}");
    let after = now_micros();
    assert_eq!(stored_ids(&service).await?, BTreeSet::from([0, 2, 4]));

    let (status, object) = get_json(&service.url("/objects/0")).await?;
    assert_eq!(status, 200, "{object}");
    assert_eq!(object["id"], 0, "GET /objects/0 must show id 0: {object}");
    let last_seen = parse_rfc3339_micros(object["last_seen"].as_str().unwrap_or_default())?;
    let expires_at = parse_rfc3339_micros(object["expires_at"].as_str().unwrap_or_default())?;
    assert!(
        before <= last_seen && last_seen <= after,
        "last_seen {last_seen} not within [{before}, {after}]"
    );
    assert_eq!(expires_at - last_seen, ttl.as_micros() as i64);

    let (status, missing) = get_json(&service.url("/objects/1")).await?;
    assert_eq!(status, 404, "odd ids are never stored: {missing}");
    assert_eq!(missing["error"], "not_found");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_hidden_at_their_deadline_and_deleted_within_50_ms() -> anyhow::Result<()> {
    let upstream = Upstream::start(0, 5).await?;
    let ttl = Duration::from_millis(1_500);
    let service = Service::start(&upstream.base_url(), ttl, &[]).await?;

    let (status, _) = post_callback(&service, &json!({"object_ids": [10, 12, 14]})).await?;
    assert_eq!(status, 202);
    wait_idle(&service, 3, 3).await?;
    let (_, list) = get_json(&service.url("/objects")).await?;
    let deadlines: Vec<i64> = list["objects"]
        .as_array()
        .expect("objects array")
        .iter()
        .map(|o| parse_rfc3339_micros(o["expires_at"].as_str().unwrap_or_default()))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(deadlines.len(), 3, "{list}");
    let deadline = *deadlines.iter().max().expect("three rows");

    // Watch both what the API shows and what the table physically holds, until empty.
    let mut deleted_at = None;
    let give_up = tokio::time::Instant::now() + ttl + WAIT;
    while tokio::time::Instant::now() < give_up {
        let asked_at = now_micros();
        let shown = stored_ids(&service).await?;
        for &id in &shown {
            let row_deadline = deadlines[((id - 10) / 2) as usize];
            assert!(
                asked_at < row_deadline,
                "row {id} was shown {} µs after its deadline",
                asked_at - row_deadline
            );
        }
        let checked_at = now_micros();
        let physical = service.physical_ids()?;
        if physical.is_empty() {
            assert!(
                checked_at >= deadline - 1_000,
                "rows deleted {} µs before their deadline",
                deadline - checked_at
            );
            deleted_at = Some(checked_at);
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let deleted_at = deleted_at.expect("rows were never deleted");
    let lateness_ms = (deleted_at - deadline) as f64 / 1_000.0;
    assert!(
        lateness_ms <= 50.0,
        "rows were deleted {lateness_ms:.1} ms after their deadline"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_status_and_envelope_and_the_service_survives()
-> anyhow::Result<()> {
    let upstream = Upstream::start(0, 5).await?;
    let service = Service::start(
        &upstream.base_url(),
        Duration::from_secs(60),
        &[("CALLBACK_HTTP__MAX_BODY_BYTES", "1024")],
    )
    .await?;
    let client = http();
    let json_post = |body: String| {
        client
            .post(service.url("/callback"))
            .header("content-type", "application/json")
            .body(body)
    };
    let cases = vec![
        (
            "malformed json",
            json_post("{\"object_ids\": [1,".into()),
            400,
            "invalid_json",
            None,
        ),
        (
            "negative id",
            json_post(r#"{"object_ids":[1,-2]}"#.into()),
            422,
            "invalid_object_id",
            Some("object_ids[1]"),
        ),
        (
            "float id",
            json_post(r#"{"object_ids":[1.5]}"#.into()),
            422,
            "invalid_object_id",
            Some("object_ids[0]"),
        ),
        (
            "string id",
            json_post(r#"{"object_ids":[0,1,"2"]}"#.into()),
            422,
            "invalid_object_id",
            Some("object_ids[2]"),
        ),
        (
            "id past i64",
            json_post(r#"{"object_ids":[9223372036854775808]}"#.into()),
            422,
            "invalid_object_id",
            Some("object_ids[0]"),
        ),
        (
            "too large body",
            json_post(format!("{{\"object_ids\":[{}]}}", vec!["1"; 600].join(","))),
            413,
            "payload_too_large",
            None,
        ),
        (
            "wrong content type",
            client
                .post(service.url("/callback"))
                .header("content-type", "text/plain")
                .body("{\"object_ids\":[1]}"),
            415,
            "unsupported_media_type",
            None,
        ),
        (
            "wrong method",
            client.get(service.url("/callback")),
            405,
            "method_not_allowed",
            None,
        ),
        (
            "unknown path",
            client.get(service.url("/nope")),
            404,
            "not_found",
            None,
        ),
    ];
    for (name, request, status, code, mention) in cases {
        let response = request.send().await?;
        assert_eq!(response.status().as_u16(), status, "{name}");
        let body: Value = response.json().await?;
        assert_eq!(body["error"], code, "{name}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty(),
            "{name}: the envelope has a message: {body}"
        );
        if let Some(mention) = mention {
            assert!(
                message.contains(mention),
                "{name}: {message:?} should name {mention}"
            );
        }
    }
    let (status, health) = get_json(&service.url("/")).await?;
    assert_eq!(status, 200, "still healthy after bad input: {health}");
    assert_eq!(health["status"], "ok");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_work_in_flight_finishes_it_and_exits_0() -> anyhow::Result<()> {
    let upstream = Upstream::start(300, 600).await?;
    let mut service = Service::start(&upstream.base_url(), Duration::from_secs(60), &[]).await?;

    let ids: Vec<i64> = (100..140).collect();
    let (status, _) = post_callback(&service, &json!({ "object_ids": ids })).await?;
    assert_eq!(status, 202);
    service.process.signal("TERM")?;
    let exit = service.process.wait(WAIT).await?;
    assert_eq!(
        exit.code(),
        Some(0),
        "output:\n{}",
        service.process.lines().join("\n")
    );

    let even: Vec<i64> = ids.iter().copied().filter(|id| id % 2 == 0).collect();
    assert_eq!(
        service.physical_ids()?,
        even,
        "accepted work was finished before exit"
    );
    assert!(
        service
            .process
            .lines()
            .iter()
            .any(|l| l.contains("callback-service stopped")),
        "the shutdown is logged"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_service_reports_callbacks_accepted_and_even_ids_stored() -> anyhow::Result<()> {
    let upstream = Upstream::start(0, 5).await?;
    let service = Service::start(&upstream.base_url(), Duration::from_secs(60), &[]).await?;

    let mut command = tokio::process::Command::new(&tests::bins().client_service);
    command
        .current_dir(service.dir())
        .args(["--no-upstream", "--target", &service.url("/callback")])
        .args(["--interval-ms", "200", "--rounds", "2"])
        .env("CLIENT_EMITTER__REPORT_DELAY_MS", "500")
        .env("RUST_LOG", "warn");
    let mut client = tests::Process::spawn(command)?;
    let exit = client.wait(WAIT).await?;
    assert_eq!(exit.code(), Some(0), "{}", client.lines().join("\n"));
    let reports: Vec<String> = client
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("round="))
        .collect();
    assert_eq!(reports.len(), 2, "one report line per round: {reports:?}");
    for report in &reports {
        assert!(report.contains("status=202"), "{report}");
        let stored = report
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("stored_even="))
            .expect("stored_even in the report");
        let (seen, sent) = stored.split_once('/').expect("stored_even=N/M");
        assert_eq!(seen, sent, "every even id sent is stored: {report}");
    }
    Ok(())
}
