//! `ingress`: N connections post 200-id callbacks (ids 0..99) back to back (closed loop).
//!
//! Reports accepted callbacks/s, ack latency p50/p99/p99.9, non-2xx answers, the service's
//! CPU and memory (RSS fresh, before the load after a warm-up of one callback per
//! connection, its peak, and after the load once the backlog is gone), and "kept up": how long after the load stops until every even id of the last
//! accepted callbacks is stored with a `last_seen` after that callback was sent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::load::{self, Answer};
use super::plot::{self, Chart, Figure};
use super::postgres::Cluster;
use super::procs::{Bins, Proc, Stack, StackOptions};
use super::report::{self, Check, Outcome, Table, mb, ms, num, to_mb};
use super::store;

/// Target: accepted callbacks per second, both backends.
const THROUGHPUT_TARGET: f64 = 10_000.0;
/// Target: ack latency p99, both backends.
const ACK_P99_TARGET_MS: f64 = 25.0;
/// Target (PostgreSQL): how soon after the load the last callbacks' ids are stored.
const KEPT_UP_TARGET_MS: f64 = 5_000.0;
/// Target: the RSS peak during the load.
const RSS_PEAK_TARGET_MB: f64 = 150.0;
/// Target: RSS after the load, relative to RSS before it.
const RSS_BACK_FACTOR: f64 = 1.2;
/// How long RSS may take to come back after the backlog is gone.
const RSS_SETTLE: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    /// Per accepted callback, beside its latency: when it was sent, in seconds since the
    /// load started (for the plot; the send time is taken anyway for the latency).
    sent_s: Vec<f64>,
    accepted: u64,
    non_2xx: u64,
    errors: u64,
    /// For each id in a callback that got a 202: the latest send time.
    last_sent: BTreeMap<i64, i64>,
}

async fn run_load(
    api: SocketAddr,
    seconds: Duration,
    connections: usize,
    credentials: &load::Credentials,
) -> anyhow::Result<Tally> {
    let client = load::client(Duration::from_secs(5))?;
    let bodies: Arc<Vec<(Vec<i64>, String)>> = Arc::new(
        (0..64)
            .map(|seed| {
                let ids = load::reference_ids(seed);
                let body = load::body(ids.iter().copied());
                (ids, body)
            })
            .collect(),
    );
    let url = format!("http://{api}/callback");
    let started = Instant::now();
    let end = started + seconds;
    let workers: Vec<_> = (0..connections)
        .map(|worker| {
            let (client, bodies, url) = (client.clone(), bodies.clone(), url.clone());
            let credentials = credentials.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                // The latest accepted send of each body, turned into per-id times at the
                // end: the bookkeeping per callback stays O(1), so the load generator's
                // CPU goes to sending, not to tracking 200 ids per answer.
                let mut body_sent: Vec<Option<i64>> = vec![None; bodies.len()];
                let mut n = worker;
                while Instant::now() < end {
                    n += connections;
                    let which = n % bodies.len();
                    let body = bodies[which].1.clone();
                    let posted = load::post_with(&client, &url, body, &credentials).await;
                    match posted.answer {
                        Answer::Accepted => {
                            tally.accepted += 1;
                            tally
                                .latencies_ms
                                .push(posted.latency.as_secs_f64() * 1_000.0);
                            tally
                                .sent_s
                                .push(posted.sent.saturating_duration_since(started).as_secs_f64());
                            body_sent[which] = Some(posted.sent_us);
                        }
                        Answer::Refused(_) => tally.non_2xx += 1,
                        Answer::Failed => tally.errors += 1,
                    }
                }
                for (sent, (ids, _)) in body_sent.iter().zip(bodies.iter()) {
                    let Some(sent) = *sent else { continue };
                    for &id in ids {
                        let kept = tally.last_sent.entry(id).or_insert(sent);
                        *kept = (*kept).max(sent);
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for worker in workers {
        let t = worker.await?;
        total.latencies_ms.extend(t.latencies_ms);
        total.sent_s.extend(t.sent_s);
        total.accepted += t.accepted;
        total.non_2xx += t.non_2xx;
        total.errors += t.errors;
        for (id, at) in t.last_sent {
            let kept = total.last_sent.entry(id).or_insert(at);
            *kept = (*kept).max(at);
        }
    }
    Ok(total)
}

/// Time from the end of the load until every even id is stored fresh, or `None` after 60 s.
async fn kept_up(api: SocketAddr, owed: &BTreeMap<i64, i64>) -> anyhow::Result<Option<Duration>> {
    let client = load::client(Duration::from_secs(5))?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let page = store::objects(&client, api, None, store::MAX_PAGE).await?;
        let stored: BTreeMap<i64, i64> = page
            .rows
            .iter()
            .map(|row| (row.id, row.last_seen_us))
            .collect();
        let fresh = owed
            .iter()
            .filter(|(id, _)| *id % 2 == 0)
            .all(|(id, sent)| stored.get(id).is_some_and(|seen| seen >= sent));
        if fresh {
            return Ok(Some(started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(None)
}

/// One callback per connection at once, then waits until their ids are stored: the
/// connections, pools and caches a running service holds exist before RSS is read.
async fn warm_up(
    api: SocketAddr,
    connections: usize,
    credentials: &load::Credentials,
) -> anyhow::Result<()> {
    let client = load::client(Duration::from_secs(5))?;
    let url = format!("http://{api}/callback");
    let mut posts = tokio::task::JoinSet::new();
    for seed in 0..connections {
        let (client, url, credentials) = (client.clone(), url.clone(), credentials.clone());
        let ids = load::reference_ids(seed as u64 + 1_000);
        posts.spawn(async move {
            let body = load::body(ids.iter().copied());
            let posted = load::post_with(&client, &url, body, &credentials).await;
            (ids, posted)
        });
    }
    let mut owed = BTreeMap::new();
    while let Some(done) = posts.join_next().await {
        let (ids, posted) = done?;
        if posted.answer == Answer::Accepted {
            owed.extend(ids.into_iter().map(|id| (id, posted.sent_us)));
        }
    }
    kept_up(api, &owed).await?;
    Ok(())
}

/// RSS once it is back within [`RSS_BACK_FACTOR`] of `start`, or after [`RSS_SETTLE`];
/// with the time it took.
async fn rss_after(service: &Proc, start: Option<u64>) -> (Option<u64>, Duration) {
    let began = Instant::now();
    loop {
        let now = service.rss_bytes();
        let back = now
            .zip(start)
            .is_some_and(|(now, start)| now as f64 <= start as f64 * RSS_BACK_FACTOR);
        if back || began.elapsed() >= RSS_SETTLE {
            return (now, began.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn run(
    bins: &Bins,
    cluster: Option<&Cluster>,
    seconds: Duration,
    connections: usize,
    trace_sample: Option<f64>,
    auth: load::Auth,
) -> anyhow::Result<Outcome> {
    let options = StackOptions {
        latency_ms: (0, 5),
        ttl_ms: None,
        trace_sample,
    };
    let mut stack =
        Stack::start_with_env(bins, cluster, "ingress", options, &auth.service_env()).await?;
    eprintln!(
        "bench: ingress, {connections} connections, {} s, traces {}, auth {auth:?}",
        seconds.as_secs(),
        trace_sample.map_or("off".to_owned(), |r| format!("exported, sampled at {r}"))
    );
    let credentials = auth.credentials();
    let rss_fresh = stack.service.rss_bytes();
    warm_up(stack.api, connections, &credentials)
        .await
        .context("warm up")?;
    let rss_start = stack.service.rss_bytes();
    let cpu = stack.service.cpu_meter();
    let wall = Instant::now();
    let tally = run_load(stack.api, seconds, connections, &credentials).await?;
    let elapsed = wall.elapsed();
    let cpu_percent = cpu.percent(&stack.service);
    stack.ensure_running()?;
    let kept_up = kept_up(stack.api, &tally.last_sent)
        .await
        .context("read the store")?;
    let rss_peak = stack.service.rss_peak_bytes();
    let (rss_after, settled_in) = rss_after(&stack.service, rss_start).await;
    let span_batches = stack.zipkin.as_ref().map(super::zipkin::Sink::batches);
    stack.stop().await?;
    if let Some(batches) = span_batches {
        eprintln!("bench: the zipkin sink received {batches} span batches");
    }

    let figure = figure(&tally, connections);
    let sorted = report::sorted(tally.latencies_ms);
    let (p50, p99, p999) = (
        report::percentile(&sorted, 50.0),
        report::percentile(&sorted, 99.0),
        report::percentile(&sorted, 99.9),
    );
    let per_second = tally.accepted as f64 / elapsed.as_secs_f64();
    let kept_up_ms = kept_up.map(|d| d.as_secs_f64() * 1_000.0);

    let mut table = Table::new(&[
        "scenario",
        "accepted/s",
        "ack p50",
        "p99",
        "p99.9",
        "non-2xx",
        "errors",
        "service CPU",
        "RSS fresh",
        "RSS start",
        "RSS peak",
        "RSS after",
        "kept up",
    ]);
    table.row(vec![
        "ingress".into(),
        format!("{per_second:.0}"),
        ms(p50),
        ms(p99),
        ms(p999),
        tally.non_2xx.to_string(),
        tally.errors.to_string(),
        cpu_percent.map_or("?".into(), |p| format!("{p:.0} %")),
        mb(rss_fresh),
        mb(rss_start),
        mb(rss_peak),
        format!("{} (+{:.1} s)", mb(rss_after), settled_in.as_secs_f64()),
        kept_up_ms.map_or("not within 60 s".into(), ms),
    ]);
    table.print();
    report::legend(&[
        "accepted/s: callbacks answered 202 per second; ack: send → whole 202 read (closed loop)",
        "service CPU: (utime+stime)/wall over the load, 100 % = one core",
        "RSS fresh: before any request; RSS start: after a warm-up of one callback per connection, before the load",
        "RSS after: once back within 20 % of RSS start, at most 10 s after \"kept up\"",
        "kept up: load end → every even id of the last accepted callbacks stored with a fresh last_seen",
    ]);

    let mb_of = |bytes: Option<u64>| bytes.map(to_mb);
    let mut checks = vec![
        Check::new(
            "ingress",
            "accepted callbacks/s",
            format!("≥ {THROUGHPUT_TARGET:.0}"),
            format!("{per_second:.0}"),
            Some(per_second >= THROUGHPUT_TARGET),
        ),
        Check::new(
            "ingress",
            "ack p99",
            format!("≤ {ACK_P99_TARGET_MS:.0} ms"),
            ms(p99),
            Some(p99 <= ACK_P99_TARGET_MS),
        ),
    ];
    // The PostgreSQL row of the targets adds these two; SQLite's reports them in the table.
    if cluster.is_some() {
        checks.push(Check::new(
            "ingress",
            "non-2xx answers",
            "0",
            tally.non_2xx.to_string(),
            Some(tally.non_2xx == 0),
        ));
        checks.push(Check::new(
            "ingress",
            "kept up",
            format!("≤ {KEPT_UP_TARGET_MS:.0} ms"),
            kept_up_ms.map_or("not within 60 s".into(), ms),
            Some(kept_up_ms.is_some_and(|k| k <= KEPT_UP_TARGET_MS)),
        ));
    }
    checks.extend([
        Check::new(
            "ingress",
            "RSS peak",
            format!("≤ {RSS_PEAK_TARGET_MB:.0} MB"),
            mb(rss_peak),
            mb_of(rss_peak).map(|peak| peak <= RSS_PEAK_TARGET_MB),
        ),
        Check::new(
            "ingress",
            "RSS after the load",
            "≤ RSS start + 20 %".to_owned(),
            format!("{} vs {}", mb(rss_after), mb(rss_start)),
            rss_after
                .zip(rss_start)
                .map(|(after, start)| after as f64 <= start as f64 * RSS_BACK_FACTOR),
        ),
    ]);
    let json = json!({
        "scenario": "ingress",
        "connections": connections,
        "auth": format!("{auth:?}"),
        "seconds": num(elapsed.as_secs_f64()),
        "accepted": tally.accepted,
        "accepted_per_s": per_second.round(),
        "ack_p50_ms": num(p50),
        "ack_p99_ms": num(p99),
        "ack_p999_ms": num(p999),
        "non_2xx": tally.non_2xx,
        "errors": tally.errors,
        "service_cpu_percent": cpu_percent.map(num),
        "rss_fresh_mb": mb_of(rss_fresh).map(num),
        "rss_start_mb": mb_of(rss_start).map(num),
        "rss_peak_mb": mb_of(rss_peak).map(num),
        "rss_after_mb": mb_of(rss_after).map(num),
        "rss_after_wait_s": num(settled_in.as_secs_f64()),
        "kept_up_ms": kept_up_ms.map(num),
    });
    Ok(Outcome {
        json,
        checks,
        figure: Some(figure),
    })
}

/// Accepted callbacks per second and their ack latency per second, by send time.
fn figure(tally: &Tally, connections: usize) -> Figure {
    let samples: Vec<(f64, f64)> = tally
        .sent_s
        .iter()
        .copied()
        .zip(tally.latencies_ms.iter().copied())
        .collect();
    let buckets = plot::buckets(&samples, 1.0);
    let x = "time since the load started (s), by send time, 1 s buckets";
    let series = |name: &str, value: fn(&plot::Bucket) -> f64| {
        plot::bucket_series(name, &buckets, 1.0, value)
    };
    Figure {
        file: "ingress.svg",
        charts: vec![
            Chart::new(
                format!(
                    "ingress: accepted callbacks per second ({connections} connections, 200 ids each, closed loop)"
                ),
                x,
                "accepted callbacks/s",
                vec![series("accepted callbacks/s", |b| b.count as f64)],
            ),
            Chart::new(
                "ingress: ack latency per second (send → whole 202 read)",
                x,
                "ack latency (ms)",
                vec![
                    series("p50", |b| b.p50),
                    series("p99", |b| b.p99),
                    series("max", |b| b.max),
                ],
            ),
        ],
    }
}
