//! `soak` (optional, runs only when named): mixed load for a long time; RSS and open file
//! descriptors must not grow.
//!
//! The load, all at once for `--seconds` (600 by default), upstream 1–50 ms, the service's
//! default TTL (30 s) unless `--ttl-ms` is given, so rows come, get refreshed and expire:
//! the reference client (200 ids from 0..99 every 5 s), a stream of fresh ids (half even,
//! stored; half odd, reported offline) at `--soak-rate` ids/s in 200-id callbacks (open
//! loop), and a reader fetching `GET /objects?limit=1000` and `GET /` every second.
//! The service's RSS (VmRSS) and open fds (`/proc/<pid>/fd`) are sampled every 5 s.
//! "Grew": the mean RSS of the last third of the samples exceeds the middle third's by
//! more than 10 %, or the median fd count of the last third exceeds the middle third's by
//! more than 8 (the first third is warm-up: pools fill, the table reaches its TTL size).
//! A leak raises every later sample; a burst (a dispatch of many ids opens as many
//! upstream connections for a moment) raises a few, and shows in the maximum instead. A
//! run shorter than three TTLs is not judged. Each sender's slowest answer is reported:
//! a stall of the service shows there, and as errors of the reference client (1 s timeout).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::load::{self, Answer, Background, IDS_PER_CALLBACK, Posted};
use super::plot::{Chart, Figure, Series};
use super::postgres::Cluster;
use super::procs::{Bins, Stack, StackOptions};
use super::report::{self, Check, Outcome, Table, mb, num, to_mb};
use super::store;

/// How often RSS and fds are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The mean RSS of the last third may exceed the middle third's by this factor.
const RSS_GROWTH_FACTOR: f64 = 1.10;
/// The median fd count of the last third may exceed the middle third's by this many.
const FD_GROWTH: usize = 8;
/// Fewer samples than this cannot tell growth from warm-up.
const MIN_SAMPLES: usize = 6;
/// The service's default TTL, in milliseconds.
const SERVICE_DEFAULT_TTL_MS: u64 = 30_000;
/// The first fresh id; the reference client's ids stay below it.
const FIRST_FRESH_ID: i64 = 1_000;

/// What `cargo xtask bench soak` is told.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub duration: Duration,
    /// Fresh ids per second.
    pub rate: u64,
    /// The service's TTL; `None` keeps its default.
    pub ttl_ms: Option<u64>,
}

/// The answers one sender got.
#[derive(Debug, Default)]
struct Counts {
    accepted: AtomicU64,
    non_2xx: AtomicU64,
    errors: AtomicU64,
    /// The slowest answer (or give-up), in microseconds.
    slowest_us: AtomicU64,
}

impl Counts {
    fn count(&self, posted: Posted) {
        let counter = match posted.answer {
            Answer::Accepted => &self.accepted,
            Answer::Refused(_) => &self.non_2xx,
            Answer::Failed => &self.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(posted.latency.as_micros()).unwrap_or(u64::MAX);
        self.slowest_us.fetch_max(micros, Ordering::Relaxed);
    }

    /// The counts now.
    fn tally(&self) -> Tally {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Tally {
            accepted: get(&self.accepted),
            non_2xx: get(&self.non_2xx),
            errors: get(&self.errors),
            slowest_ms: get(&self.slowest_us) as f64 / 1_000.0,
        }
    }
}

/// One reading of [`Counts`].
#[derive(Debug, Clone, Copy)]
struct Tally {
    accepted: u64,
    non_2xx: u64,
    errors: u64,
    slowest_ms: f64,
}

impl Tally {
    /// Both senders' answers together.
    fn plus(self, other: Tally) -> Tally {
        Tally {
            accepted: self.accepted + other.accepted,
            non_2xx: self.non_2xx + other.non_2xx,
            errors: self.errors + other.errors,
            slowest_ms: self.slowest_ms.max(other.slowest_ms),
        }
    }

    fn to_json(self) -> serde_json::Value {
        json!({
            "accepted": self.accepted,
            "non_2xx": self.non_2xx,
            "errors": self.errors,
            "slowest_ms": num(self.slowest_ms),
        })
    }
}

/// First, last and largest sample, and whether the series grew after warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Trend {
    first: f64,
    last: f64,
    max: f64,
    /// `None` with fewer than [`MIN_SAMPLES`] samples.
    grew: Option<bool>,
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

fn largest(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn median(values: &[f64]) -> f64 {
    report::percentile(&report::sorted(values.to_vec()), 50.0)
}

/// The trend of `samples`, judged by `grew(middle third, last third)`.
fn trend(samples: &[f64], grew: impl Fn(&[f64], &[f64]) -> bool) -> Option<Trend> {
    let (first, last) = (*samples.first()?, *samples.last()?);
    let n = samples.len();
    Some(Trend {
        first,
        last,
        max: largest(samples),
        grew: (n >= MIN_SAMPLES).then(|| grew(&samples[n / 3..2 * n / 3], &samples[2 * n / 3..])),
    })
}

fn rss_trend(samples: &[f64]) -> Option<Trend> {
    trend(samples, |middle, last| {
        mean(last) > mean(middle) * RSS_GROWTH_FACTOR
    })
}

fn fd_trend(samples: &[f64]) -> Option<Trend> {
    trend(samples, |middle, last| {
        median(last) > median(middle) + FD_GROWTH as f64
    })
}

pub async fn run(
    bins: &Bins,
    cluster: Option<&Cluster>,
    options: Options,
) -> anyhow::Result<Outcome> {
    let stack_options = StackOptions {
        latency_ms: (1, 50),
        ttl_ms: options.ttl_ms,
        trace_sample: None,
    };
    let mut stack = Stack::start(bins, cluster, "soak", stack_options).await?;
    eprintln!(
        "bench: soak, {} s: reference client + {} fresh ids/s + a reader, upstream 1–50 ms",
        options.duration.as_secs_f64(),
        options.rate
    );
    let (reference_counts, fresh_counts) =
        (Arc::new(Counts::default()), Arc::new(Counts::default()));
    let url = format!("http://{}/callback", stack.api);
    let reference = {
        let (client, url, counts) = (
            load::client(Duration::from_secs(1))?,
            url.clone(),
            Arc::clone(&reference_counts),
        );
        Background::spawn(load::open_loop(0.2, options.duration, 4, move |k| {
            let body = load::body(load::reference_ids(k));
            let (client, url, counts) = (client.clone(), url.clone(), Arc::clone(&counts));
            async move { counts.count(load::post(&client, &url, body).await) }
        }))
    };
    let fresh = {
        let (client, url, counts) = (
            load::client(Duration::from_secs(5))?,
            url,
            Arc::clone(&fresh_counts),
        );
        let per_second = options.rate as f64 / IDS_PER_CALLBACK as f64;
        Background::spawn(load::open_loop(
            per_second,
            options.duration,
            256,
            move |k| {
                let first =
                    FIRST_FRESH_ID + i64::try_from(k).unwrap_or(0) * IDS_PER_CALLBACK as i64;
                let body = load::body(first..first + IDS_PER_CALLBACK as i64);
                let (client, url, counts) = (client.clone(), url.clone(), Arc::clone(&counts));
                async move { counts.count(load::post(&client, &url, body).await) }
            },
        ))
    };
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (client, api, reads) = (
            load::client(Duration::from_secs(5))?,
            stack.api,
            Arc::clone(&reads),
        );
        Background::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let page = store::objects(&client, api, None, 1_000).await;
                let health = match client.get(format!("http://{api}/")).send().await {
                    Ok(response) => {
                        response.status().is_success() && response.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                if page.is_ok() && health {
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let cpu = stack.service.cpu_meter();
    let started = Instant::now();
    let end = started + options.duration;
    let (mut rss, mut fds) = (Vec::new(), Vec::new());
    // When each sample was taken, in seconds since the load started (for the plot).
    let (mut rss_at, mut fds_at) = (Vec::new(), Vec::new());
    let mut sample = tokio::time::interval(SAMPLE_EVERY);
    let mut next_report = started + Duration::from_secs(60);
    while Instant::now() < end {
        tokio::select! {
            _ = sample.tick() => {
                stack.ensure_running()?;
                let at = started.elapsed().as_secs_f64();
                if let Some(bytes) = stack.service.rss_bytes() {
                    rss.push(to_mb(bytes));
                    rss_at.push(at);
                }
                if let Some(n) = stack.service.fd_count() {
                    fds.push(n as f64);
                    fds_at.push(at);
                }
                if Instant::now() >= next_report {
                    next_report += Duration::from_secs(60);
                    eprintln!(
                        "bench: soak, {:.0} s: RSS {:.1} MB, {} fds, {} callbacks accepted",
                        started.elapsed().as_secs_f64(),
                        rss.last().copied().unwrap_or(f64::NAN),
                        fds.last().copied().unwrap_or(f64::NAN),
                        reference_counts.tally().plus(fresh_counts.tally()).accepted,
                    );
                }
            }
            () = tokio::time::sleep_until(end) => {}
        }
    }
    let wall = started.elapsed();
    let cpu_percent = cpu.percent(&stack.service);
    drop(reader);
    let (mut reference, mut fresh) = (reference, fresh);
    let reference_sent = (&mut reference.0).await?;
    let fresh_sent = (&mut fresh.0).await?;
    let rss_peak = stack.service.rss_peak_bytes();
    stack.stop().await?;

    // Before the table has lived through a TTL, growth is warm-up: judge longer runs only.
    let ttl = Duration::from_millis(options.ttl_ms.unwrap_or(SERVICE_DEFAULT_TTL_MS));
    let judged = |t: Option<Trend>| {
        t.map(|t| Trend {
            grew: t.grew.filter(|_| wall >= ttl * 3),
            ..t
        })
    };
    let rss_trend = judged(rss_trend(&rss));
    let fd_trend = judged(fd_trend(&fds));
    let (reference_tally, fresh_tally) = (reference_counts.tally(), fresh_counts.tally());
    let Tally {
        accepted,
        non_2xx,
        errors,
        ..
    } = reference_tally.plus(fresh_tally);
    let not_sent = reference_sent.skipped + fresh_sent.skipped;
    let grew = |t: Option<Trend>| match t.and_then(|t| t.grew) {
        Some(true) => "yes",
        Some(false) => "no",
        None => "too short to tell",
    };
    let cells = |t: Option<Trend>, unit: &str| match t {
        Some(t) if unit.is_empty() => format!("{:.0} / {:.0} / {:.0}", t.first, t.last, t.max),
        Some(t) => format!(
            "{:.1}{unit} / {:.1}{unit} / {:.1}{unit}",
            t.first, t.last, t.max
        ),
        None => "?".into(),
    };
    let mut table = Table::new(&[
        "seconds",
        "accepted",
        "non-2xx",
        "errors (reference / fresh)",
        "slowest answer (reference / fresh)",
        "not sent",
        "reads",
        "service CPU",
        "RSS first / last / max",
        "RSS grew",
        "fds first / last / max",
        "fds grew",
        "RSS peak",
    ]);
    table.row(vec![
        format!("{:.0}", wall.as_secs_f64()),
        accepted.to_string(),
        non_2xx.to_string(),
        format!(
            "{errors} ({} / {})",
            reference_tally.errors, fresh_tally.errors
        ),
        format!(
            "{:.0} ms / {:.0} ms",
            reference_tally.slowest_ms, fresh_tally.slowest_ms
        ),
        not_sent.to_string(),
        reads.load(Ordering::Relaxed).to_string(),
        cpu_percent.map_or("?".into(), |p| format!("{p:.1} %")),
        cells(rss_trend, " MB"),
        grew(rss_trend).to_owned(),
        cells(fd_trend, ""),
        grew(fd_trend).to_owned(),
        mb(rss_peak),
    ]);
    table.print();
    report::legend(&[
        "load: reference client (200 ids of 0..99 every 5 s) + fresh ids (half stored, half offline) in 200-id callbacks, open loop + a reader (GET /objects, GET / each second); upstream 1–50 ms",
        "errors: no answer within the sender's timeout (reference 1 s, fresh 5 s); slowest answer: send → whole answer read, or give-up",
        "RSS (VmRSS) and fds (/proc/<pid>/fd) sampled every 5 s; grew: last third vs middle third of the samples, RSS mean + 10 %, fds median + 8",
        "judged only with 6 samples or more and a run of 3 TTLs or more (before that, growth is warm-up)",
    ]);
    let trend_json = |t: Option<Trend>| {
        t.map(|t| json!({ "first": num(t.first), "last": num(t.last), "max": num(t.max), "grew": t.grew }))
    };
    let checks = vec![
        Check::new(
            "soak",
            "RSS does not grow",
            "last third ≤ middle third + 10 %",
            cells(rss_trend, " MB"),
            rss_trend.and_then(|t| t.grew).map(|grew| !grew),
        ),
        Check::new(
            "soak",
            "open fds do not grow",
            "median of last third ≤ middle third's + 8",
            cells(fd_trend, ""),
            fd_trend.and_then(|t| t.grew).map(|grew| !grew),
        ),
    ];
    let figure = figure(zip(&rss_at, &rss), zip(&fds_at, &fds), options.rate, wall);
    let json = json!({
        "scenario": "soak",
        "seconds": num(wall.as_secs_f64()),
        "fresh_ids_per_s": options.rate,
        "accepted": accepted,
        "non_2xx": non_2xx,
        "errors": errors,
        "reference": reference_tally.to_json(),
        "fresh": fresh_tally.to_json(),
        "not_sent": not_sent,
        "service_cpu_percent": cpu_percent.map(num),
        "rss_mb": trend_json(rss_trend),
        "fds": trend_json(fd_trend),
        "rss_peak_mb": rss_peak.map(to_mb).map(num),
        "rss_samples_mb": rss.iter().copied().map(num).collect::<Vec<_>>(),
        "fd_samples": fds,
    });
    Ok(Outcome {
        json,
        checks,
        figure: Some(figure),
    })
}

fn zip(at: &[f64], values: &[f64]) -> Vec<(f64, f64)> {
    at.iter().copied().zip(values.iter().copied()).collect()
}

/// RSS and open fds over the run, one point per sample.
fn figure(rss: Vec<(f64, f64)>, fds: Vec<(f64, f64)>, rate: u64, wall: Duration) -> Figure {
    let x = format!(
        "time since the load started (s), a sample every {} s",
        SAMPLE_EVERY.as_secs()
    );
    let load = format!(
        "{:.0} s: reference client + {rate} fresh ids/s + a reader",
        wall.as_secs_f64()
    );
    Figure {
        file: "soak.svg",
        charts: vec![
            Chart::new(
                format!("soak: service RSS ({load})"),
                x.as_str(),
                "RSS, VmRSS (MB)",
                vec![Series::new("RSS (MB)", rss)],
            ),
            Chart::new(
                format!("soak: service open file descriptors ({load})"),
                x.as_str(),
                "open fds (/proc/<pid>/fd)",
                vec![Series::new("open fds", fds)],
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_is_not_growth_but_a_steady_climb_is() {
        let warm_then_flat = [10.0, 20.0, 30.0, 30.0, 31.0, 30.0, 30.5, 31.0, 30.0];
        let t = rss_trend(&warm_then_flat).unwrap();
        assert_eq!((t.first, t.last, t.max), (10.0, 30.0, 31.0));
        assert_eq!(t.grew, Some(false));
        let climbing: Vec<f64> = (0..9).map(|n| 30.0 + 5.0 * f64::from(n)).collect();
        assert_eq!(rss_trend(&climbing).unwrap().grew, Some(true));
        assert_eq!(rss_trend(&[1.0, 2.0]).unwrap().grew, None, "too short");
        assert!(rss_trend(&[]).is_none());
    }

    #[test]
    fn fds_may_wobble_by_a_few() {
        let wobble = [20.0, 40.0, 41.0, 40.0, 44.0, 42.0, 45.0, 48.0, 43.0];
        assert_eq!(fd_trend(&wobble).unwrap().grew, Some(false));
        let leak = [20.0, 40.0, 41.0, 40.0, 44.0, 42.0, 45.0, 60.0, 70.0];
        assert_eq!(fd_trend(&leak).unwrap().grew, Some(true));
    }

    #[test]
    fn a_burst_of_fds_that_closes_again_is_not_growth() {
        let burst = [16.0, 308.0, 305.0, 311.0, 305.0, 303.0, 307.0, 525.0, 306.0];
        let t = fd_trend(&burst).unwrap();
        assert_eq!(t.max, 525.0, "the burst still shows as the maximum");
        assert_eq!(t.grew, Some(false));
    }
}
