//! An upstream outage far longer than the in-process retries, end to end: the real
//! `callback-service` on SQLite and PostgreSQL, the upstream simulator behind a proxy the
//! test cuts for a minute while callbacks keep arriving.
//!
//! What a user must see: every callback is still answered `202` during the outage; once
//! the upstream is back every even id of every `202` is stored and nothing is a dead
//! letter; the circuit breaker opened and closed again (its metric); and while the
//! upstream was down it was asked only a bounded number of times (each request costs the
//! proxy one refused connection while cut). The same with a `kill -9` of the service in
//! the middle of the outage. And a dead letter outlives a restart and is stored once an
//! operator replays it.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use tests::{Backend, Proxy, Service, Upstream, eventually, http};
use tokio::time::Instant;

/// How long the upstream is away: four times the old 15 s retry deadline.
const OUTAGE: Duration = Duration::from_secs(60);
/// The bound on a whole test.
const TEST_DEADLINE: Duration = Duration::from_secs(180);
/// How often a callback is sent, and how many fresh ids each names.
const SEND_EVERY: Duration = Duration::from_millis(250);
const IDS_PER_CALLBACK: i64 = 4;
const TTL: Duration = Duration::from_secs(3600);
const POLL: Duration = Duration::from_millis(50);

/// Most fetches in flight per instance.
const MAX_IN_FLIGHT: usize = 16;
/// Transient failures in a row that open the breaker, and its cool-down.
const BREAKER_FAILURES: usize = 5;
const COOL_DOWN: Duration = Duration::from_secs(2);
/// The in-process retry deadline of one fetch: a few attempts at most.
const RETRY_DEADLINE: Duration = Duration::from_millis(500);
/// Attempts one fetch can make within [`RETRY_DEADLINE`]: the first, then retries after
/// pauses of at least 100 ms, 200 ms, 400 ms (the upstream client's smallest backoff).
const MAX_ATTEMPTS_PER_FETCH: usize = 3;
/// The longest pause of the durable retry schedule: how long an id may still wait once
/// the upstream is back.
const RETRY_MAX_DELAY: Duration = Duration::from_secs(2);

fn outage_env() -> Vec<(&'static str, String)> {
    vec![
        ("CALLBACK_UPSTREAM__REQUEST_TIMEOUT_MS", "1000".into()),
        ("CALLBACK_UPSTREAM__CONNECT_TIMEOUT_MS", "200".into()),
        (
            "CALLBACK_UPSTREAM__RETRY_DEADLINE_MS",
            RETRY_DEADLINE.as_millis().to_string(),
        ),
        ("CALLBACK_UPSTREAM__RETRY_FIRST_DELAY_MS", "200".into()),
        (
            "CALLBACK_UPSTREAM__RETRY_MAX_DELAY_MS",
            RETRY_MAX_DELAY.as_millis().to_string(),
        ),
        (
            "CALLBACK_UPSTREAM__MAX_IN_FLIGHT",
            MAX_IN_FLIGHT.to_string(),
        ),
        (
            "CALLBACK_UPSTREAM__BREAKER_FAILURES",
            BREAKER_FAILURES.to_string(),
        ),
        (
            "CALLBACK_UPSTREAM__BREAKER_COOL_DOWN_MS",
            COOL_DOWN.as_millis().to_string(),
        ),
        ("CALLBACK_PIPELINE__POLL_INTERVAL_MS", "100".into()),
    ]
}

/// The most requests `instances` runs of the service can make while the upstream is down
/// for `outage`: per run, the fetches in flight when it went down or started before the
/// breaker opened (at most `MAX_IN_FLIGHT + BREAKER_FAILURES`), then one probe per
/// cool-down; each fetch at most [`MAX_ATTEMPTS_PER_FETCH`] requests, and each request at
/// most two connections (the HTTP client retries once on a pooled connection found
/// closed).
fn request_bound(outage: Duration, instances: usize) -> usize {
    let probes = (outage.as_millis() / COOL_DOWN.as_millis()) as usize + 1;
    let fetches = instances * (MAX_IN_FLIGHT + BREAKER_FAILURES) + probes;
    fetches * MAX_ATTEMPTS_PER_FETCH * 2
}

async fn bounded(test: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tests::bounded(TEST_DEADLINE, test).await
}

/// Sends callbacks of fresh ids and remembers every id answered `202`.
struct Sender {
    next: i64,
    accepted: BTreeSet<i64>,
    refused: usize,
}

impl Sender {
    fn new() -> Self {
        Self {
            next: 0,
            accepted: BTreeSet::new(),
            refused: 0,
        }
    }

    /// One callback to `service`; an answer other than `202` is counted, not an error
    /// (the service may be restarting).
    async fn send(&mut self, service: &Service) -> anyhow::Result<()> {
        let ids: Vec<i64> = (self.next..self.next + IDS_PER_CALLBACK).collect();
        self.next += IDS_PER_CALLBACK;
        let answer = http()
            .post(service.url("/callback"))
            .json(&json!({ "object_ids": ids }))
            .send()
            .await;
        match answer {
            Ok(answer) if answer.status() == 202 => self.accepted.extend(ids),
            _ => self.refused += 1,
        }
        Ok(())
    }

    /// Sends for `period`, one callback every [`SEND_EVERY`].
    async fn send_for(&mut self, service: &Service, period: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + period;
        let mut tick = tokio::time::interval(SEND_EVERY);
        while Instant::now() < until {
            tick.tick().await;
            self.send(service).await?;
        }
        Ok(())
    }

    fn even(&self) -> BTreeSet<i64> {
        self.accepted
            .iter()
            .copied()
            .filter(|id| id % 2 == 0)
            .collect()
    }
}

/// The sum of the samples of `name` whose labels include `label` (e.g. `to="open"`; empty
/// for every sample).
async fn metric(service: &Service, name: &str, label: &str) -> anyhow::Result<f64> {
    let text = http()
        .get(service.admin_url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            labels.contains(label).then_some(value)
        })
        .filter_map(|value| value.trim().parse::<f64>().ok())
        .sum())
}

async fn health(service: &Service) -> anyhow::Result<Value> {
    Ok(http().get(service.url("/")).send().await?.json().await?)
}

/// Waits until the breaker of `service` has opened, and checks health says so.
async fn breaker_opens(service: &Service) -> anyhow::Result<()> {
    eventually(Duration::from_secs(15), POLL, || async {
        Ok(
            (metric(service, "upstream_breaker_transitions_total", "to=\"open\"").await? >= 1.0)
                .then_some(()),
        )
    })
    .await
    .context("the breaker never opened while the upstream was down")?;
    let body = health(service).await?;
    let state = &body["components"]["upstream"]["breaker"]["state"];
    ensure!(
        state == "open" || state == "half_open",
        "health during the outage: {body}"
    );
    Ok(())
}

/// Every even accepted id ends stored, nothing is a dead letter, the inbox is empty and
/// the breaker closed again.
async fn everything_settles(service: &Service, sender: &Sender) -> anyhow::Result<()> {
    let even = sender.even();
    ensure!(even.len() > 100, "too few ids accepted: {}", even.len());
    let settle = Duration::from_secs(30);
    let started = Instant::now();
    eventually(settle, Duration::from_millis(200), || async {
        let stored: BTreeSet<i64> = service.physical_ids().await?.into_iter().collect();
        Ok(even.is_subset(&stored).then_some(()))
    })
    .await
    .with_context(|| {
        format!("not every even accepted id was stored within {settle:?} of the upstream's return")
    })?;
    println!(
        "every one of {} even accepted ids stored {:.1?} after the upstream came back",
        even.len(),
        started.elapsed()
    );
    let failures: Value = http()
        .get(service.admin_url("/failures"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        failures["failures"] == json!([]),
        "dead letters: {failures}"
    );
    eventually(Duration::from_secs(10), POLL, || async {
        let closed = metric(
            service,
            "upstream_breaker_transitions_total",
            "to=\"closed\"",
        )
        .await?;
        let state = metric(service, "upstream_breaker_state", "").await?;
        let pending = health(service).await?["pipeline"]["pending_ids"].clone();
        Ok((closed >= 1.0 && state == 0.0 && pending == 0).then_some(()))
    })
    .await
    .context("the breaker did not close, or ids are left pending")?;
    let body = health(service).await?;
    ensure!(
        body["components"]["upstream"]["breaker"]["state"] == "closed",
        "{body}"
    );
    ensure!(
        metric(service, "fetch_failures_total", "").await? == 0.0,
        "no dead letter"
    );
    Ok(())
}

async fn start(backend: Backend, upstream: &str) -> anyhow::Result<Option<Service>> {
    let env = outage_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Service::start(backend, upstream, TTL, &env).await
}

/// Cuts the upstream for [`OUTAGE`] while a callback arrives every [`SEND_EVERY`], with a
/// `kill -9` and restart of the service half-way through when `kill` is set; then checks
/// the bound on the requests the upstream saw and that everything settles.
async fn outage(backend: Backend, kill: bool) -> anyhow::Result<()> {
    bounded(async {
        let upstream = Upstream::start(0, 5).await?;
        let proxy = Proxy::start(upstream.addr).await?;
        let Some(mut service) = start(backend, &format!("http://{}", proxy.addr())).await? else {
            return Ok(());
        };
        let mut sender = Sender::new();
        sender.send_for(&service, Duration::from_secs(2)).await?;

        proxy.cut();
        let refused_before = proxy.refused_connections();
        let down_since = Instant::now();
        sender.send_for(&service, Duration::from_secs(5)).await?;
        breaker_opens(&service).await?;
        let mut runs = 1;
        if kill {
            sender.send_for(&service, OUTAGE / 2).await?;
            service.kill().await?;
            service = service.restarted().await?;
            runs += 1;
        }
        sender
            .send_for(&service, OUTAGE.saturating_sub(down_since.elapsed()))
            .await?;
        breaker_opens(&service).await?;
        let requests = proxy.refused_connections() - refused_before;
        let down_for = down_since.elapsed();
        proxy.restore();
        if !kill {
            ensure!(
                sender.refused == 0,
                "{} callbacks were not answered 202 during the outage",
                sender.refused
            );
        }

        let bound = request_bound(down_for, runs);
        println!(
            "upstream down {down_for:.1?}, {runs} run(s) of the service: {requests} requests reached it (bound {bound}); {} ids accepted, {} callbacks not answered 202",
            sender.accepted.len(),
            sender.refused
        );
        ensure!(
            requests <= bound,
            "the upstream was asked {requests} times while down, more than the bound {bound}"
        );
        everything_settles(&service, &sender).await
    })
    .await
}

async fn an_upstream_outage_of_a_minute_loses_nothing(backend: Backend) -> anyhow::Result<()> {
    outage(backend, false).await
}

async fn a_kill_during_an_upstream_outage_loses_nothing(backend: Backend) -> anyhow::Result<()> {
    outage(backend, true).await
}

async fn a_dead_letter_outlives_a_restart_and_replay_stores_it(
    backend: Backend,
) -> anyhow::Result<()> {
    bounded(async {
        let upstream = Upstream::start(0, 5).await?;
        let proxy = Proxy::start(upstream.addr).await?;
        let mut env = outage_env();
        // A horizon as short as the in-process retries: a fetch that fails is a dead
        // letter at once.
        env.push(("CALLBACK_UPSTREAM__RETRY_HORIZON_MS", "500".into()));
        env.push(("CALLBACK_UPSTREAM__BREAKER_FAILURES", "0".into()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let url = format!("http://{}", proxy.addr());
        let Some(mut service) = Service::start(backend, &url, TTL, &env).await? else {
            return Ok(());
        };
        proxy.cut();
        let answer = http()
            .post(service.url("/callback"))
            .json(&json!({ "object_ids": [42, 43] }))
            .send()
            .await?;
        ensure!(answer.status() == 202, "{answer:?}");
        let letters = eventually(Duration::from_secs(15), POLL, || async {
            let body: Value = http()
                .get(service.admin_url("/failures"))
                .send()
                .await?
                .json()
                .await?;
            Ok((body["failures"].as_array().map_or(0, Vec::len) == 2).then_some(body))
        })
        .await
        .context("the two ids never became dead letters")?;
        for letter in letters["failures"].as_array().into_iter().flatten() {
            ensure!(letter["code"] == "unreachable", "{letter}");
        }

        service.kill().await?;
        proxy.restore();
        let service = service.restarted().await?;
        let body: Value = http()
            .get(service.admin_url("/failures?ids=42"))
            .send()
            .await?
            .json()
            .await?;
        ensure!(
            body["failures"].as_array().map_or(0, Vec::len) == 1,
            "the dead letter outlived the restart: {body}"
        );
        ensure!(
            !service.physical_ids().await?.contains(&42),
            "a dead letter is not fetched again by itself"
        );

        let replayed: Value = http()
            .post(service.admin_url("/failures/replay"))
            .json(&json!({ "all": true }))
            .send()
            .await?
            .json()
            .await?;
        ensure!(replayed["replayed"] == 2, "{replayed}");
        eventually(Duration::from_secs(15), POLL, || async {
            Ok(service.physical_ids().await?.contains(&42).then_some(()))
        })
        .await
        .context("the replayed id was never stored")?;
        let body: Value = http()
            .get(service.admin_url("/failures"))
            .send()
            .await?
            .json()
            .await?;
        ensure!(body["failures"] == json!([]), "{body}");
        Ok(())
    })
    .await
}

tests::on_both_backends!(
    an_upstream_outage_of_a_minute_loses_nothing,
    a_kill_during_an_upstream_outage_loses_nothing,
    a_dead_letter_outlives_a_restart_and_replay_stores_it,
);
