//! The probes an orchestrator uses, against the real binary: `GET /livez` (the process
//! serves) and `GET /readyz` (it can take callbacks), and the order of a SIGTERM: readiness
//! turns 503 first while everything is still served, and only then does the listener stop.
//! (The database side, `/readyz` 503 and `/livez` 200 while PostgreSQL is cut, is in the
//! fault suite, tests/tests/faults.rs.)

use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use tests::scrape::{parse, scrape, value};
use tests::{Backend, Service, Upstream, bounded, eventually, http};

const TEST_DEADLINE: Duration = Duration::from_secs(90);
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);
/// Long enough for every check made inside it, even on a loaded machine: the test ends
/// the wait early with a second SIGTERM.
const SHUTDOWN_DELAY_MS: &str = "30000";

async fn get(url: &str) -> anyhow::Result<(u16, Value)> {
    let response = http().get(url).send().await?;
    let status = response.status().as_u16();
    let body = response.json().await.context("a JSON body")?;
    Ok((status, body))
}

async fn service_ready_gauge(service: &Service) -> anyhow::Result<Option<f64>> {
    let (_, text) = scrape(service).await?;
    Ok(value(&parse(&text)?, "service_ready", &[]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_503_on_sigterm_before_the_listener_closes() -> anyhow::Result<()> {
    bounded(TEST_DEADLINE, async {
        let upstream = Upstream::start(0, 5).await?;
        let mut service = Service::start(
            Backend::Sqlite,
            &upstream.base_url(),
            Duration::from_secs(600),
            &[("CALLBACK_HTTP__SHUTDOWN_DELAY_MS", SHUTDOWN_DELAY_MS)],
        )
        .await?
        .context("SQLite is always there")?;

        let live = get(&service.url("/livez")).await?;
        ensure!(live == (200, json!({ "status": "alive" })), "{live:?}");
        eventually(WAIT, POLL, || async {
            Ok((get(&service.url("/readyz")).await?.0 == 200).then_some(()))
        })
        .await
        .context("/readyz never turned 200 after the start")?;
        let ready = get(&service.url("/readyz")).await?;
        ensure!(ready == (200, json!({ "status": "ready" })), "{ready:?}");
        ensure!(
            service_ready_gauge(&service).await? == Some(1.0),
            "service_ready is not 1 while /readyz answers 200"
        );

        service.process.signal("TERM")?;
        let (status, body) = eventually(WAIT, POLL, || async {
            let answer = get(&service.url("/readyz")).await?;
            Ok((answer.0 == 503).then_some(answer))
        })
        .await
        .context("/readyz did not turn 503 after SIGTERM")?;
        ensure!(
            status == 503 && body["error"] == "not_ready" && body["component"] == "shutdown",
            "/readyz during the shutdown delay: {body}"
        );
        ensure!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "the envelope says nothing: {body}"
        );

        // Not ready, yet still serving: a load balancer's last requests are answered.
        let live = get(&service.url("/livez")).await?;
        ensure!(live.0 == 200, "/livez during the shutdown delay: {live:?}");
        service
            .accept_callback(&[1, 2])
            .await
            .context("a callback during the shutdown delay")?;
        ensure!(
            service_ready_gauge(&service).await? == Some(0.0),
            "service_ready is not 0 while /readyz answers 503"
        );
        let lines = service.process.lines();
        ensure!(
            !lines.iter().any(|l| l.contains("stopped accepting")),
            "the listener stopped before the delay was over:\n{}",
            lines.join("\n")
        );

        // A second SIGTERM ends the delay: the listener drains and the process exits.
        service.process.signal("TERM")?;
        let status = service.process.wait(WAIT).await?;
        ensure!(status.success(), "exit status {status}");
        let lines = service.process.lines();
        let position = |needle: &str| {
            lines
                .iter()
                .position(|l| l.contains(needle))
                .with_context(|| format!("no line says {needle:?}:\n{}", lines.join("\n")))
        };
        let not_ready = position("GET /readyz answers 503 from now on")?;
        let skipped = position("second signal: not waiting")?;
        let stopped = position("stopped accepting")?;
        ensure!(
            not_ready < skipped && skipped < stopped,
            "the shutdown went in the wrong order:\n{}",
            lines.join("\n")
        );
        ensure!(
            http().get(service.url("/livez")).send().await.is_err(),
            "the listener still answers after the exit"
        );
        Ok(())
    })
    .await
}
