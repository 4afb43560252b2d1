//! The emitter against a fake callback-service on 127.0.0.1.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use client_service::config::{Config, EmitterSection, EmitterSettings, Secret, UpstreamSection};
use client_service::emitter;
use client_service::report::{PostOutcome, RoundReport};
use client_service::signing::WebhookKey;
use support::FakeService;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// How long any test waits for something that should happen in milliseconds.
const PATIENCE: Duration = Duration::from_secs(10);

/// Fast rounds against `target`; `tweak` adjusts the section before it is checked.
fn settings(target: String, tweak: impl FnOnce(&mut EmitterSection)) -> EmitterSettings {
    let mut config = Config {
        emitter: EmitterSection {
            target,
            interval_ms: 20,
            max_ids: 50,
            id_max: 20,
            timeout_ms: 1000,
            report_delay_ms: 10,
            rounds: 3,
            enabled: true,
            ..EmitterSection::default()
        },
        ..Config::default()
    };
    tweak(&mut config.emitter);
    config.settings().unwrap().emitter.unwrap()
}

fn drain<T>(receiver: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
    let mut items = Vec::new();
    while let Ok(item) = receiver.try_recv() {
        items.push(item);
    }
    items
}

async fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/callback")
}

#[tokio::test]
async fn sends_the_configured_rounds_and_reports_each_one() {
    let (service, mut callbacks) = FakeService::start().await;
    let (reports, mut received) = mpsc::unbounded_channel();
    timeout(
        PATIENCE,
        emitter::run(
            settings(service.callback_url(), |_| {}),
            reports,
            CancellationToken::new(),
        ),
    )
    .await
    .expect("the emitter stops after its rounds")
    .unwrap();

    let bodies = drain(&mut callbacks);
    assert_eq!(bodies.len(), 3, "one callback per round");
    let mut sent = Vec::new();
    for callback in &bodies {
        assert_eq!(callback.content_type.as_deref(), Some("application/json"));
        let ids: Vec<u64> = callback.body["object_ids"]
            .as_array()
            .expect("object_ids is an array")
            .iter()
            .map(|v| v.as_u64().expect("ids are non-negative integers"))
            .collect();
        assert!((1..=50).contains(&ids.len()), "{} ids", ids.len());
        assert!(ids.iter().all(|id| *id <= 20), "{ids:?}");
        let distinct: HashSet<u64> = ids.iter().copied().collect();
        let even = distinct.iter().filter(|id| *id % 2 == 0).count();
        sent.push((ids.len(), distinct.len(), even));
    }

    let mut reports: Vec<RoundReport> = drain(&mut received);
    reports.sort_by_key(|r| r.round);
    assert_eq!(
        reports.iter().map(|r| r.round).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let mut reported: Vec<_> = reports
        .iter()
        .map(|r| (r.sent, r.distinct, r.even))
        .collect();
    sent.sort_unstable();
    reported.sort_unstable();
    assert_eq!(reported, sent, "the reports count what was sent");
    for report in &reports {
        assert_eq!(
            report.post,
            PostOutcome::Answered {
                status: 202,
                accepted: Some(report.distinct as u64)
            }
        );
        assert_eq!(report.stored_even, Some(report.even), "{report}");
        assert_eq!(report.stored_odd, Some(0), "{report}");
        let line = report.to_string();
        assert!(
            line.starts_with(&format!(
                "round={} sent={} distinct={} even={} status=202 accepted={} latency_ms=",
                report.round, report.sent, report.distinct, report.even, report.distinct
            )),
            "{line}"
        );
        assert!(
            line.ends_with(&format!(" stored_even={0}/{0} stored_odd=0", report.even)),
            "{line}"
        );
    }
    assert!(
        service
            .object_queries()
            .iter()
            .all(|q| q.contains("limit=10000")),
        "{:?}",
        service.object_queries()
    );
    service.stop().await;
}

#[tokio::test]
async fn with_credentials_each_callback_is_signed_over_its_body_and_each_request_has_the_key() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (service, mut callbacks) = FakeService::start().await;
    let (reports, mut received) = mpsc::unbounded_channel();
    let settings = settings(service.callback_url(), |emitter| {
        emitter.api_key = Secret("key-1".to_owned());
        emitter.webhook_secret = Secret(SECRET.to_owned());
    });
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    timeout(
        PATIENCE,
        emitter::run(settings, reports, CancellationToken::new()),
    )
    .await
    .expect("the emitter stops after its rounds")
    .unwrap();

    let key = WebhookKey::parse(SECRET).unwrap();
    let bodies = drain(&mut callbacks);
    assert_eq!(bodies.len(), 3);
    let mut ids = HashSet::new();
    for callback in &bodies {
        let header = |name: &str| callback.headers[name].to_str().unwrap().to_owned();
        let id = header("webhook-id");
        assert!(ids.insert(id.clone()), "a fresh webhook-id per send: {id}");
        let timestamp: i64 = header("webhook-timestamp").parse().unwrap();
        let lag = timestamp - i64::try_from(started).unwrap();
        assert!((0..=10).contains(&lag), "the time of sending: {timestamp}");
        assert_eq!(
            header("webhook-signature"),
            key.sign(&id, timestamp, &callback.raw),
            "signed over the exact body sent"
        );
        assert_eq!(header("authorization"), "Bearer key-1");
    }
    assert_eq!(drain(&mut received).len(), 3);
    let authorizations = service.object_authorizations();
    assert!(!authorizations.is_empty());
    assert!(
        authorizations
            .iter()
            .all(|a| a.as_deref() == Some("Bearer key-1")),
        "{authorizations:?}"
    );
    service.stop().await;
}

#[tokio::test]
async fn without_credentials_nothing_is_signed() {
    let (service, mut callbacks) = FakeService::start().await;
    let (reports, _received) = mpsc::unbounded_channel();
    let settings = settings(service.callback_url(), |emitter| emitter.rounds = 1);
    timeout(
        PATIENCE,
        emitter::run(settings, reports, CancellationToken::new()),
    )
    .await
    .expect("the emitter stops after its round")
    .unwrap();
    let callback = drain(&mut callbacks).pop().expect("one callback");
    for name in ["authorization", "webhook-id", "webhook-signature"] {
        assert!(!callback.headers.contains_key(name), "{name}");
    }
    assert_eq!(service.object_authorizations(), [None]);
    service.stop().await;
}

#[tokio::test]
async fn a_post_past_its_timeout_is_reported_as_an_error() {
    let (service, mut callbacks) = FakeService::start().await;
    service.delay_posts(Duration::from_secs(30));
    let (reports, mut received) = mpsc::unbounded_channel();
    let settings = settings(service.callback_url(), |emitter| {
        emitter.rounds = 1;
        emitter.timeout_ms = 100;
        emitter.report_delay_ms = 0;
    });
    timeout(
        PATIENCE,
        emitter::run(settings, reports, CancellationToken::new()),
    )
    .await
    .expect("the emitter stops after its round")
    .unwrap();

    assert_eq!(drain(&mut callbacks).len(), 1);
    let report = received.try_recv().expect("one report");
    assert_eq!(
        report.post,
        PostOutcome::Failed {
            error: "timed out".into()
        }
    );
    assert!(report.latency >= Duration::from_millis(100), "{report}");
    let line = report.to_string();
    assert!(
        line.contains(r#" status=error error="timed out" accepted=? "#),
        "{line}"
    );
    // The check itself worked: nothing was stored for the unanswered callback.
    assert_eq!(report.stored_even, Some(0), "{line}");
    service.stop().await;
}

#[tokio::test]
async fn an_unreachable_service_is_reported_and_the_check_marked_unknown() {
    let (reports, mut received) = mpsc::unbounded_channel();
    let settings = settings(refused_url().await, |emitter| {
        emitter.rounds = 1;
        emitter.report_delay_ms = 0;
    });
    timeout(
        PATIENCE,
        emitter::run(settings, reports, CancellationToken::new()),
    )
    .await
    .expect("the emitter stops after its round")
    .unwrap();

    let report = received.try_recv().expect("one report");
    let PostOutcome::Failed { error } = &report.post else {
        panic!("expected a failure, got {report}");
    };
    assert!(error.starts_with("connection failed"), "{error}");
    let line = report.to_string();
    assert!(
        line.contains(" status=error error=\"connection failed"),
        "{line}"
    );
    assert!(line.ends_with(" stored_even=? stored_odd=?"), "{line}");
}

#[tokio::test]
async fn an_endless_emitter_stops_on_shutdown() {
    let (service, mut callbacks) = FakeService::start().await;
    let (reports, _received) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let settings = settings(service.callback_url(), |emitter| {
        emitter.rounds = 0;
        emitter.interval_ms = 10;
        emitter.report_delay_ms = 60_000;
    });
    let running = tokio::spawn(emitter::run(settings, reports, shutdown.clone()));
    for _ in 0..3 {
        timeout(PATIENCE, callbacks.recv())
            .await
            .expect("callbacks keep coming")
            .expect("the fake is running");
    }
    shutdown.cancel();
    timeout(PATIENCE, running)
        .await
        .expect("the emitter stops on shutdown, without waiting for its checks")
        .unwrap()
        .unwrap();
    service.stop().await;
}

#[tokio::test]
async fn the_program_stops_by_itself_after_its_rounds() {
    let (service, mut callbacks) = FakeService::start().await;
    let config = Config {
        upstream: UpstreamSection {
            listen: "127.0.0.1:0".into(),
            min_latency_ms: 0,
            max_latency_ms: 5,
            enabled: true,
        },
        emitter: EmitterSection {
            target: service.callback_url(),
            interval_ms: 10,
            report_delay_ms: 10,
            rounds: 2,
            ..EmitterSection::default()
        },
        ..Config::default()
    };
    let shutdown = CancellationToken::new();
    timeout(
        PATIENCE,
        client_service::run(config.settings().unwrap(), shutdown.clone()),
    )
    .await
    .expect("simulator and emitter stop once the rounds are reported")
    .unwrap();
    assert!(shutdown.is_cancelled());
    assert_eq!(drain(&mut callbacks).len(), 2);
    service.stop().await;
}
