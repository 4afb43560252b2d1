//! `real`: the reference client's load against the reference upstream: one callback of
//! 200 ids drawn from 0..99 every 5 s (1 s client timeout), upstream 300–4000 ms.
//!
//! Measures the service's CPU (average over the load window, from `/proc/<pid>/stat`),
//! RSS (sampled every second from VmRSS, peak from VmHWM), the visibility lag of each
//! accepted even id (the first poll of `GET /objects` showing its row with a `last_seen`
//! after the callback was sent, − the time the `202` was read), and the deletion lateness
//! against `last_seen + ttl` as the service records it in its `expiry_lateness_seconds`
//! histogram (one observation per delete batch, at the histogram's bucket resolution).
//! The TTL is short (`--ttl-ms`, 10 s by default) so rows expire during the run; after the
//! load the bench waits until the last row's `expires_at` + 2 s so every row is deleted
//! before the histogram is read.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};

use super::load::{self, Answer, Background, Posted, lock};
use super::plot::{Chart, Figure, Series};
use super::postgres::Cluster;
use super::procs::{Bins, Stack, StackOptions};
use super::report::{self, Check, Outcome, Table, mb, ms, num, to_mb};
use super::store::{self, Row};

/// The reference client's interval between callbacks.
const INTERVAL: Duration = Duration::from_secs(5);
/// The reference client gives up on a callback after this.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);
/// An id not visible this long after its `202` counts as not visible.
const GIVE_UP: Duration = Duration::from_secs(10);
/// The default TTL of this scenario, short enough for deletions within a minute.
pub const DEFAULT_TTL_MS: u64 = 10_000;
/// Target: average CPU over the load, % of one core.
const CPU_TARGET_PERCENT: f64 = 2.0;
/// Target: RSS peak.
const RSS_TARGET_MB: f64 = 40.0;
/// Target: deletion lateness p99, in seconds.
const DELETION_P99_TARGET_S: f64 = 0.05;

/// What `cargo xtask bench real` is told.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How long callbacks are sent.
    pub duration: Duration,
    /// How often the store is read while ids are waiting to show up.
    pub poll: Duration,
    /// The service's TTL.
    pub ttl_ms: u64,
}

/// An accepted even id waiting to show up fresh in the store.
#[derive(Debug, Clone, Copy)]
struct Pending {
    id: i64,
    sent_us: i64,
    acked_us: i64,
}

/// What was accepted and what the poller saw.
#[derive(Debug, Default)]
struct Tracker {
    pending: Vec<Pending>,
    lags_ms: Vec<f64>,
    /// Beside each lag: when its callback was sent (µs since the epoch), for the plot.
    lag_sent_us: Vec<i64>,
    fetched_ms: Vec<f64>,
    not_visible: u64,
    accepted: u64,
    non_2xx: u64,
    errors: u64,
    latest_expiry_us: i64,
    polls: u64,
    poll_errors: u64,
}

impl Tracker {
    /// Records the answer to a callback naming `ids`.
    fn answer(&mut self, ids: &[i64], posted: &Posted) {
        match posted.answer {
            Answer::Accepted => self.accepted += 1,
            Answer::Refused(_) => {
                self.non_2xx += 1;
                return;
            }
            Answer::Failed => {
                self.errors += 1;
                return;
            }
        }
        let mut even: Vec<i64> = ids.iter().copied().filter(|id| id % 2 == 0).collect();
        even.sort_unstable();
        even.dedup();
        self.pending.extend(even.into_iter().map(|id| Pending {
            id,
            sent_us: posted.sent_us,
            acked_us: posted.answered_us,
        }));
    }

    /// Settles the pending ids that `rows`, read at `at_us`, show fresh, and gives up on
    /// those waiting longer than `give_up_us`.
    fn record(&mut self, rows: &[Row], at_us: i64, give_up_us: i64) {
        for row in rows {
            self.latest_expiry_us = self.latest_expiry_us.max(row.expires_us);
        }
        let mut still = Vec::with_capacity(self.pending.len());
        for pending in self.pending.drain(..) {
            let fresh = rows
                .iter()
                .find(|row| row.id == pending.id && row.last_seen_us >= pending.sent_us);
            if let Some(row) = fresh {
                self.lags_ms
                    .push((at_us - pending.acked_us).max(0) as f64 / 1_000.0);
                self.lag_sent_us.push(pending.sent_us);
                self.fetched_ms
                    .push((row.last_seen_us - pending.acked_us) as f64 / 1_000.0);
            } else if at_us - pending.acked_us > give_up_us {
                self.not_visible += 1;
            } else {
                still.push(pending);
            }
        }
        self.pending = still;
    }
}

/// Reads the store every `every` while ids are waiting to show up.
async fn poll(
    client: reqwest::Client,
    api: SocketAddr,
    tracker: Arc<Mutex<Tracker>>,
    every: Duration,
) {
    let give_up_us = i64::try_from(GIVE_UP.as_micros()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if lock(&tracker).pending.is_empty() {
            continue;
        }
        // At most 50 even ids are ever stored: one page holds them all.
        match store::objects(&client, api, None, store::MAX_PAGE).await {
            Ok(page) => {
                let mut tracker = lock(&tracker);
                tracker.polls += 1;
                tracker.record(&page.rows, load::now_micros(), give_up_us);
            }
            Err(_) => lock(&tracker).poll_errors += 1,
        }
    }
}

pub async fn run(
    bins: &Bins,
    cluster: Option<&Cluster>,
    options: Options,
) -> anyhow::Result<Outcome> {
    let stack_options = StackOptions {
        latency_ms: (300, 4000),
        ttl_ms: Some(options.ttl_ms),
        trace_sample: None,
    };
    let mut stack = Stack::start(bins, cluster, "real", stack_options).await?;
    eprintln!(
        "bench: real, a 200-id callback every 5 s for {} s, upstream 300–4000 ms, ttl {} ms",
        options.duration.as_secs_f64(),
        options.ttl_ms
    );
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let poller = Background::spawn(poll(
        load::client(Duration::from_secs(5))?,
        stack.api,
        Arc::clone(&tracker),
        options.poll,
    ));
    let client = load::client(CLIENT_TIMEOUT)?;
    let url = format!("http://{}/callback", stack.api);
    let cpu = stack.service.cpu_meter();
    let started = Instant::now();
    let started_us = load::now_micros();
    let mut sender = {
        let tracker = Arc::clone(&tracker);
        let per_second = 1.0 / INTERVAL.as_secs_f64();
        Background::spawn(load::open_loop(per_second, options.duration, 4, move |k| {
            let ids = load::reference_ids(k);
            let body = load::body(ids.iter().copied());
            let (client, url, tracker) = (client.clone(), url.clone(), Arc::clone(&tracker));
            async move {
                let posted = load::post(&client, &url, body).await;
                lock(&tracker).answer(&ids, &posted);
            }
        }))
    };
    let (mut rss_sum, mut rss_samples, mut rss_max) = (0_u64, 0_u64, None::<u64>);
    let mut rss_points = Vec::new();
    let mut sample = tokio::time::interval(Duration::from_secs(1));
    let load_end = started + options.duration;
    while Instant::now() < load_end {
        tokio::select! {
            _ = sample.tick() => {
                stack.ensure_running()?;
                if let Some(rss) = stack.service.rss_bytes() {
                    rss_sum += rss;
                    rss_samples += 1;
                    rss_max = Some(rss_max.map_or(rss, |max| max.max(rss)));
                    rss_points.push((started.elapsed().as_secs_f64(), to_mb(rss)));
                }
            }
            () = tokio::time::sleep_until(load_end) => {}
        }
    }
    let cpu_percent = cpu.percent(&stack.service);
    let window = started.elapsed();
    (&mut sender.0).await.context("the sender")?;
    // Let the last ids show up (or be given up on), then every row expire and be deleted.
    let wait_visible = Instant::now() + GIVE_UP + Duration::from_secs(1);
    while !lock(&tracker).pending.is_empty() && Instant::now() < wait_visible {
        tokio::time::sleep(options.poll).await;
    }
    drop(poller);
    let latest_expiry_us = lock(&tracker).latest_expiry_us;
    let wait_expiry = Duration::from_micros(
        u64::try_from(latest_expiry_us - load::now_micros() + 2_000_000).unwrap_or(0),
    )
    .min(Duration::from_millis(options.ttl_ms) + Duration::from_secs(6));
    eprintln!(
        "bench: real, waiting {:.1} s for the last rows to expire",
        wait_expiry.as_secs_f64()
    );
    tokio::time::sleep(wait_expiry).await;
    stack.ensure_running()?;
    let metrics = store::metrics(&load::client(Duration::from_secs(5))?, stack.admin).await?;
    let rss_peak = stack.service.rss_peak_bytes();
    stack.stop().await?;

    let lateness = store::histogram(&metrics, "expiry_lateness_seconds");
    let deleted_rows = store::series_sum(&metrics, "expired_rows_deleted_total");
    let batches = lateness.as_ref().map_or(0, |h| h.count);
    let late_p50 = lateness.as_ref().and_then(|h| h.quantile_bound(0.5));
    let late_p99 = lateness.as_ref().and_then(|h| h.quantile_bound(0.99));
    let late_mean = lateness.as_ref().map_or(f64::NAN, store::Histogram::mean);
    let rss_avg = (rss_samples > 0).then(|| rss_sum / rss_samples);
    let tracker = lock(&tracker);
    let lags = report::sorted(tracker.lags_ms.clone());
    let fetched = report::sorted(tracker.fetched_ms.clone());
    let to_ms = |s: Option<f64>| s.map_or(f64::NAN, |s| s * 1_000.0);

    let mut table = Table::new(&[
        "accepted",
        "non-2xx",
        "errors",
        "service CPU",
        "RSS avg",
        "RSS peak",
        "lag p50",
        "lag p99",
        "last_seen p99",
        "not visible",
        "deleted rows / batches",
        "deletion late p50",
        "p99",
        "mean",
    ]);
    table.row(vec![
        tracker.accepted.to_string(),
        tracker.non_2xx.to_string(),
        tracker.errors.to_string(),
        cpu_percent.map_or("?".into(), |p| format!("{p:.2} %")),
        mb(rss_avg),
        mb(rss_peak),
        ms(report::percentile(&lags, 50.0)),
        ms(report::percentile(&lags, 99.0)),
        ms(report::percentile(&fetched, 99.0)),
        tracker.not_visible.to_string(),
        format!(
            "{} / {batches}",
            deleted_rows.map_or("?".into(), |n| format!("{n:.0}"))
        ),
        format!("≤ {}", ms(to_ms(late_p50))),
        format!("≤ {}", ms(to_ms(late_p99))),
        ms(late_mean * 1_000.0),
    ]);
    table.print();
    let poll_line = format!(
        "lag: first poll (every {} ms while ids wait) showing the row with last_seen after the send − 202 read, per accepted even id; {} polls were served by the service during the run and count in its CPU",
        options.poll.as_millis(),
        tracker.polls
    );
    report::legend(&[
        "one callback of 200 ids from 0..99 every 5 s (1 s client timeout), upstream 300–4000 ms",
        "service CPU: (utime+stime)/wall over the load window, 100 % = one core; RSS avg: VmRSS each second; RSS peak: VmHWM",
        &poll_line,
        "last_seen p99: last_seen − 202 read (upstream answer time, before the commit)",
        "deletion lateness: the service's expiry_lateness_seconds histogram (earliest due last_seen + ttl → its batch's delete), one observation per delete batch; p50/p99 are bucket upper bounds",
    ]);

    let checks = vec![
        Check::new(
            "real",
            "service CPU, average",
            format!("≤ {CPU_TARGET_PERCENT:.0} % of one core"),
            cpu_percent.map_or("?".into(), |p| format!("{p:.2} %")),
            cpu_percent.map(|p| p <= CPU_TARGET_PERCENT),
        ),
        Check::new(
            "real",
            "RSS peak",
            format!("≤ {RSS_TARGET_MB:.0} MB"),
            mb(rss_peak),
            rss_peak.map(|peak| to_mb(peak) <= RSS_TARGET_MB),
        ),
        Check::new(
            "real",
            "deletion lateness p99 (bucket bound)",
            "≤ 50 ms after last_seen + ttl",
            late_p99.map_or("no deletions recorded".into(), |s| {
                format!("≤ {}", ms(s * 1_000.0))
            }),
            late_p99.map(|s| s <= DELETION_P99_TARGET_S),
        ),
    ];
    let lag_points: Vec<(f64, f64)> = tracker
        .lag_sent_us
        .iter()
        .zip(&tracker.lags_ms)
        .map(|(&sent_us, &lag)| ((sent_us - started_us) as f64 / 1e6, lag))
        .collect();
    let figure = figure(lag_points, rss_points, options.poll);
    let json = json!({
        "scenario": "real",
        "seconds": num(window.as_secs_f64()),
        "ttl_ms": options.ttl_ms,
        "accepted": tracker.accepted,
        "non_2xx": tracker.non_2xx,
        "errors": tracker.errors,
        "service_cpu_percent": cpu_percent.map(num),
        "rss_avg_mb": rss_avg.map(to_mb).map(num),
        "rss_max_sampled_mb": rss_max.map(to_mb).map(num),
        "rss_peak_mb": rss_peak.map(to_mb).map(num),
        "visible_ids": lags.len(),
        "not_visible_ids": tracker.not_visible,
        "lag_p50_ms": num(report::percentile(&lags, 50.0)),
        "lag_p99_ms": num(report::percentile(&lags, 99.0)),
        "lag_max_ms": num(report::percentile(&lags, 100.0)),
        "last_seen_lag_p99_ms": num(report::percentile(&fetched, 99.0)),
        "polls": tracker.polls,
        "poll_errors": tracker.poll_errors,
        "deleted_rows": deleted_rows,
        "delete_batches": batches,
        "deletion_lateness_p50_ms_bound": late_p50.map(|s| num(s * 1_000.0)),
        "deletion_lateness_p99_ms_bound": late_p99.map(|s| num(s * 1_000.0)),
        "deletion_lateness_mean_ms": num(late_mean * 1_000.0),
    });
    Ok(Outcome {
        json,
        checks,
        figure: Some(figure),
    })
}

/// Per callback (its visible ids' lags at its send time): lag p50 and max; RSS each second.
fn figure(lags: Vec<(f64, f64)>, rss: Vec<(f64, f64)>, poll: Duration) -> Figure {
    let x = "time since the load started (s)";
    // The ids of one callback share a send time.
    let mut callbacks: Vec<(f64, Vec<f64>)> = Vec::new();
    for (at, lag) in lags {
        match callbacks.iter_mut().find(|(sent, _)| *sent == at) {
            Some((_, lags)) => lags.push(lag),
            None => callbacks.push((at, vec![lag])),
        }
    }
    callbacks.sort_by(|a, b| a.0.total_cmp(&b.0));
    let per_callback = |p: f64| {
        callbacks
            .iter()
            .map(|(at, lags)| (*at, report::percentile(&report::sorted(lags.clone()), p)))
            .collect()
    };
    Figure {
        file: "real.svg",
        charts: vec![
            Chart::new(
                format!(
                    "real: visibility lag of each callback's even ids (polls every {} ms)",
                    poll.as_millis()
                ),
                format!("{x}, by send time"),
                "visibility lag (ms)",
                vec![
                    Series::new("p50 of the callback's ids", per_callback(50.0)),
                    Series::new("max (its slowest id)", per_callback(100.0)),
                ],
            ),
            Chart::new(
                "real: service RSS (one 200-id callback every 5 s, upstream 300–4000 ms)",
                x,
                "RSS, VmRSS (MB)",
                vec![Series::new("RSS (MB)", rss)],
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, last_seen_us: i64) -> Row {
        Row {
            id,
            last_seen_us,
            expires_us: last_seen_us + 10_000_000,
        }
    }

    #[test]
    fn the_plot_has_each_callbacks_p50_and_max_lag_at_its_send_time() {
        let lags = vec![(5.0, 300.0), (0.0, 100.0), (0.0, 900.0), (0.0, 200.0)];
        let figure = figure(lags, vec![(0.0, 20.0)], Duration::from_millis(250));
        assert_eq!(figure.file, "real.svg");
        let lag = &figure.charts[0].series;
        assert_eq!(lag[0].points, [(0.0, 200.0), (5.0, 300.0)], "p50");
        assert_eq!(lag[1].points, [(0.0, 900.0), (5.0, 300.0)], "max");
        assert_eq!(figure.charts[1].series[0].points, [(0.0, 20.0)]);
    }

    #[test]
    fn an_id_is_visible_once_its_row_is_fresher_than_the_send() {
        let mut tracker = Tracker::default();
        let posted = Posted {
            answer: Answer::Accepted,
            sent_us: 1_000_000,
            answered_us: 1_010_000,
            sent: std::time::Instant::now(),
            latency: Duration::from_millis(10),
        };
        tracker.answer(&[4, 3, 4, 6, 8], &posted);
        assert_eq!(tracker.pending.len(), 3, "distinct even ids only");
        // 4 is stored but stale (from an earlier callback); 6 is fresh; 8 is absent.
        tracker.record(&[row(4, 900_000), row(6, 1_500_000)], 1_600_000, 10_000_000);
        assert_eq!(tracker.lags_ms, vec![590.0]);
        assert_eq!(tracker.fetched_ms, vec![490.0]);
        assert_eq!(tracker.pending.len(), 2);
        assert_eq!(tracker.latest_expiry_us, 11_500_000);
        tracker.record(&[row(4, 2_000_000)], 2_100_000, 10_000_000);
        assert_eq!(tracker.lags_ms, vec![590.0, 1_090.0]);
        tracker.record(&[], 11_010_001, 10_000_000);
        assert_eq!(tracker.not_visible, 1, "8 never showed up");
        assert!(tracker.pending.is_empty());

        tracker.answer(
            &[2],
            &Posted {
                answer: Answer::Refused(503),
                ..posted
            },
        );
        assert!(tracker.pending.is_empty(), "refused ids are not owed");
        assert_eq!((tracker.accepted, tracker.non_2xx), (1, 1));
    }
}
