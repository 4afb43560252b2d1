//! `pipeline`: fresh unique ids at rising target rates (open loop), upstream 0–5 ms; the
//! highest rate at which the service stores what it accepts, quickly.
//!
//! Each step sends 200-id callbacks at evenly spaced times for the step's length, whatever
//! the answers (open loop, at most [`MAX_IN_FLIGHT`] requests waiting). Every id is a
//! fresh even number (the simulator reports even ids online, so every accepted id must be
//! stored), unique across steps. A poller reads `GET /objects?after=…` every `--poll-ms`
//! from the lowest id it has not seen yet, and notes when each id first shows up.
//!
//! Per id, lag = the poll response that first showed it − the time its callback's `202`
//! was read. This over-estimates by up to one poll interval plus the poll's own time, and
//! a row seen before its `202` was read counts as 0. `last_seen` (stamped when the
//! upstream answered, before the row is committed) gives a lower bound, reported next to
//! it. An id not seen within `--deadline-ms` of its `202` counts as not visible (an
//! infinite lag in the percentiles). A step passes when the accepted ids/s reach 95 % of
//! the target, ≥ 99.9 % of the accepted ids are visible, and lag p99 ≤ 1 s; the steps
//! stop after the first that fails. The service keeps its default TTL (30 s) unless
//! `--ttl-ms` is given, so with long steps deletes join the load as they would in
//! production.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::time::MissedTickBehavior;

use super::load::{self, Answer, Background, IDS_PER_CALLBACK, Posted, lock};
use super::plot::{Chart, Figure, Series};
use super::postgres::Cluster;
use super::procs::{Bins, Stack, StackOptions};
use super::report::{self, Check, Outcome, Table, mb, ms, num, to_mb};
use super::store::{self, Row};

/// Requests waiting for an answer at most; sends due past it are skipped and counted.
const MAX_IN_FLIGHT: usize = 1024;
/// A step passes only when its accepted ids/s reach this share of the target.
const RATE_SHARE: f64 = 0.95;
/// A step passes only when at least this share (%) of its accepted ids became visible.
const VISIBLE_TARGET_PERCENT: f64 = 99.9;
/// A step passes only when lag p99 is at most this.
const LAG_P99_TARGET_MS: f64 = 1_000.0;
/// Target on PostgreSQL: the highest passing rate.
const POSTGRES_TARGET_IDS_PER_S: f64 = 20_000.0;

/// What `cargo xtask bench pipeline` is told.
#[derive(Debug, Clone)]
pub struct Options {
    /// Target rates, ids per second, one step each, in this order.
    pub rates: Vec<u64>,
    /// How long each step sends.
    pub step: Duration,
    /// An id not visible this long after its `202` counts as not visible.
    pub deadline: Duration,
    /// How often the store is read.
    pub poll: Duration,
    /// The service's TTL; `None` keeps its default.
    pub ttl_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    Accepted,
    Refused,
    Failed,
}

/// One callback sent: ids `2 * (index * 200 + j)` for `j` in `0..200`.
#[derive(Debug, Clone, Copy)]
struct Sent {
    state: State,
    acked_us: i64,
}

/// What was sent and what the poller saw; shared by the senders and the poller.
#[derive(Debug, Default)]
struct Ledger {
    callbacks: Vec<Sent>,
    /// Per id index (`id / 2`): when a poll first showed it (µs since the epoch), 0 = not yet.
    seen_us: Vec<i64>,
    /// Per id index: its `last_seen` in that poll.
    last_seen_us: Vec<i64>,
    /// Every id index below this is settled: seen, not accepted, or past the deadline.
    low: usize,
    polls: u64,
    poll_errors: u64,
}

fn id_of(index: usize) -> i64 {
    i64::try_from(index).unwrap_or(i64::MAX / 2) * 2
}

impl Ledger {
    /// Registers a callback about to be sent and returns its index and body.
    fn open(&mut self) -> (usize, String) {
        let index = self.callbacks.len();
        self.callbacks.push(Sent {
            state: State::InFlight,
            acked_us: 0,
        });
        let first = index * IDS_PER_CALLBACK;
        self.seen_us.resize(first + IDS_PER_CALLBACK, 0);
        self.last_seen_us.resize(first + IDS_PER_CALLBACK, 0);
        (
            index,
            load::body((first..first + IDS_PER_CALLBACK).map(id_of)),
        )
    }

    /// Records the service's answer to callback `index`.
    fn answer(&mut self, index: usize, posted: &Posted) {
        let sent = &mut self.callbacks[index];
        sent.acked_us = posted.answered_us;
        sent.state = match posted.answer {
            Answer::Accepted => State::Accepted,
            Answer::Refused(_) => State::Refused,
            Answer::Failed => State::Failed,
        };
    }

    /// Notes the rows of one poll answered at `at_us`.
    fn record(&mut self, rows: &[Row], at_us: i64) {
        for row in rows {
            let Ok(index) = usize::try_from(row.id / 2) else {
                continue;
            };
            if row.id % 2 == 0
                && let Some(seen) = self.seen_us.get_mut(index)
                && *seen == 0
            {
                *seen = at_us;
                self.last_seen_us[index] = row.last_seen_us;
            }
        }
    }

    /// Moves `low` past every settled id: seen, refused or failed, or accepted more than
    /// `deadline_us` ago. Stops at a callback still waiting for its answer.
    fn settle(&mut self, now_us: i64, deadline_us: i64) {
        while self.low < self.seen_us.len() {
            let sent = self.callbacks[self.low / IDS_PER_CALLBACK];
            let settled = self.seen_us[self.low] != 0
                || matches!(sent.state, State::Refused | State::Failed)
                || (sent.state == State::Accepted && now_us - sent.acked_us > deadline_us);
            if !settled {
                break;
            }
            self.low += 1;
        }
    }

    /// The figures of the callbacks `callbacks` (one step's).
    fn step(&self, callbacks: std::ops::Range<usize>, deadline_us: i64) -> StepFigures {
        let mut figures = StepFigures::default();
        let (mut lags, mut fetched) = (Vec::new(), Vec::new());
        for index in callbacks {
            let sent = self.callbacks[index];
            match sent.state {
                State::Accepted => figures.accepted_callbacks += 1,
                State::Refused => figures.non_2xx += 1,
                State::Failed | State::InFlight => figures.errors += 1,
            }
            if sent.state != State::Accepted {
                continue;
            }
            for id_index in index * IDS_PER_CALLBACK..(index + 1) * IDS_PER_CALLBACK {
                let seen = self.seen_us[id_index];
                if seen != 0 && seen - sent.acked_us <= deadline_us {
                    figures.visible += 1;
                    lags.push((seen - sent.acked_us).max(0) as f64 / 1_000.0);
                    fetched.push((self.last_seen_us[id_index] - sent.acked_us) as f64 / 1_000.0);
                } else {
                    lags.push(f64::INFINITY);
                }
            }
        }
        figures.accepted_ids = lags.len() as u64;
        figures.lags_ms = report::sorted(lags);
        figures.fetched_lags_ms = report::sorted(fetched);
        figures
    }
}

/// One step's figures from the ledger.
#[derive(Debug, Default)]
struct StepFigures {
    accepted_callbacks: u64,
    accepted_ids: u64,
    non_2xx: u64,
    errors: u64,
    visible: u64,
    /// Per accepted id, ascending; infinite when not visible within the deadline.
    lags_ms: Vec<f64>,
    /// Per visible id, `last_seen` − ack, ascending.
    fetched_lags_ms: Vec<f64>,
}

impl StepFigures {
    fn visible_percent(&self) -> f64 {
        if self.accepted_ids == 0 {
            f64::NAN
        } else {
            100.0 * self.visible as f64 / self.accepted_ids as f64
        }
    }

    /// Whether the step meets the criteria at `target` ids/s over `window`.
    fn passes(&self, target: f64, window: Duration) -> bool {
        let per_second = self.accepted_ids as f64 / window.as_secs_f64();
        per_second >= RATE_SHARE * target
            && self.visible_percent() >= VISIBLE_TARGET_PERCENT
            && report::percentile(&self.lags_ms, 99.0) <= LAG_P99_TARGET_MS
    }
}

/// Reads the store every `every` from the lowest unsettled id and notes what shows up.
async fn poll(
    client: reqwest::Client,
    api: SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
    every: Duration,
    deadline_us: i64,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (mut after, last_id) = {
            let mut ledger = lock(&ledger);
            ledger.settle(load::now_micros(), deadline_us);
            if ledger.low >= ledger.seen_us.len() {
                continue;
            }
            let after = ledger.low.checked_sub(1).map(id_of);
            (after, id_of(ledger.seen_us.len() - 1))
        };
        loop {
            match store::objects(&client, api, after, store::MAX_PAGE).await {
                Ok(page) => {
                    let at = load::now_micros();
                    let mut ledger = lock(&ledger);
                    ledger.polls += 1;
                    ledger.record(&page.rows, at);
                    match page.next_after {
                        Some(next) if next < last_id => after = Some(next),
                        _ => break,
                    }
                }
                Err(_) => {
                    lock(&ledger).poll_errors += 1;
                    break;
                }
            }
        }
        lock(&ledger).settle(load::now_micros(), deadline_us);
    }
}

/// One step's row of the table and JSON.
#[derive(Debug)]
struct StepResult {
    target: u64,
    figures: StepFigures,
    window: Duration,
    not_sent: u64,
    cpu_percent: Option<f64>,
    rss: Option<u64>,
    pass: bool,
}

impl StepResult {
    fn accepted_per_s(&self) -> f64 {
        self.figures.accepted_ids as f64 / self.window.as_secs_f64()
    }

    fn json(&self) -> Value {
        let f = &self.figures;
        json!({
            "target_ids_per_s": self.target,
            "accepted_ids_per_s": self.accepted_per_s().round(),
            "accepted_ids": f.accepted_ids,
            "accepted_callbacks": f.accepted_callbacks,
            "non_2xx": f.non_2xx,
            "errors": f.errors,
            "not_sent": self.not_sent,
            "visible_percent": num(f.visible_percent()),
            "lag_p50_ms": num(report::percentile(&f.lags_ms, 50.0)),
            "lag_p99_ms": num(report::percentile(&f.lags_ms, 99.0)),
            "lag_max_ms": num(report::percentile(&f.lags_ms, 100.0)),
            "last_seen_lag_p99_ms": num(report::percentile(&f.fetched_lags_ms, 99.0)),
            "service_cpu_percent": self.cpu_percent.map(num),
            "rss_mb": self.rss.map(to_mb).map(num),
            "pass": self.pass,
        })
    }

    fn cells(&self) -> Vec<String> {
        let f = &self.figures;
        vec![
            self.target.to_string(),
            format!("{:.0}", self.accepted_per_s()),
            f.non_2xx.to_string(),
            f.errors.to_string(),
            self.not_sent.to_string(),
            format!("{:.2} %", f.visible_percent()),
            ms(report::percentile(&f.lags_ms, 50.0)),
            ms(report::percentile(&f.lags_ms, 99.0)),
            ms(report::percentile(&f.fetched_lags_ms, 99.0)),
            self.cpu_percent.map_or("?".into(), |p| format!("{p:.0} %")),
            mb(self.rss),
            report::verdict(Some(self.pass)).to_owned(),
        ]
    }
}

pub async fn run(
    bins: &Bins,
    cluster: Option<&Cluster>,
    options: &Options,
) -> anyhow::Result<Outcome> {
    let stack_options = StackOptions {
        latency_ms: (0, 5),
        ttl_ms: options.ttl_ms,
        trace_sample: None,
    };
    let mut stack = Stack::start(bins, cluster, "pipeline", stack_options).await?;
    let deadline_us = i64::try_from(options.deadline.as_micros()).unwrap_or(i64::MAX);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let poller = Background::spawn(poll(
        load::client(Duration::from_secs(10))?,
        stack.api,
        Arc::clone(&ledger),
        options.poll,
        deadline_us,
    ));
    let client = load::client(Duration::from_secs(5))?;
    let url = format!("http://{}/callback", stack.api);
    let mut steps = Vec::new();
    let result = async {
        for (step, &target) in options.rates.iter().enumerate() {
            stack.ensure_running()?;
            eprintln!(
                "bench: pipeline step {}: {target} ids/s for {} s",
                step + 1,
                options.step.as_secs_f64()
            );
            let first = lock(&ledger).callbacks.len();
            let cpu = stack.service.cpu_meter();
            let per_second = target as f64 / IDS_PER_CALLBACK as f64;
            let sent = load::open_loop(per_second, options.step, MAX_IN_FLIGHT, |_| {
                let (index, body) = lock(&ledger).open();
                let (client, url, ledger) = (client.clone(), url.clone(), Arc::clone(&ledger));
                async move {
                    let posted = load::post(&client, &url, body).await;
                    lock(&ledger).answer(index, &posted);
                }
            })
            .await;
            // Every answer is in: wait until each accepted id is seen or past its deadline.
            let (last, end) = {
                let ledger = lock(&ledger);
                (ledger.callbacks.len(), ledger.seen_us.len())
            };
            let give_up = Instant::now() + options.deadline + options.poll * 2;
            while lock(&ledger).low < end && Instant::now() < give_up {
                tokio::time::sleep(options.poll.min(Duration::from_millis(50))).await;
            }
            let cpu_percent = cpu.percent(&stack.service);
            let figures = lock(&ledger).step(first..last, deadline_us);
            let pass = figures.passes(target as f64, options.step);
            steps.push(StepResult {
                target,
                figures,
                window: options.step,
                not_sent: sent.skipped,
                cpu_percent,
                rss: stack.service.rss_bytes(),
                pass,
            });
            if !pass {
                break;
            }
        }
        anyhow::Ok(())
    }
    .await;
    drop(poller);
    let (polls, poll_errors) = {
        let ledger = lock(&ledger);
        (ledger.polls, ledger.poll_errors)
    };
    let rss_peak = stack.service.rss_peak_bytes();
    stack.stop().await?;
    result?;

    let highest = steps
        .iter()
        .take_while(|step| step.pass)
        .map(|step| step.target)
        .max();
    let mut table = Table::new(&[
        "target ids/s",
        "accepted ids/s",
        "non-2xx",
        "errors",
        "not sent",
        "visible",
        "lag p50",
        "lag p99",
        "last_seen p99",
        "service CPU",
        "RSS",
        "result",
    ]);
    for step in &steps {
        table.row(step.cells());
    }
    table.print();
    println!(
        "  highest passing rate: {} (RSS peak {}, {polls} polls, {poll_errors} failed)",
        highest.map_or("none".into(), |rate| format!("{rate} ids/s")),
        mb(rss_peak),
    );
    let deadline_line = format!(
        "visible: accepted ids seen within {} ms of their 202; lag = first poll that showed the id − 202 read (over-estimates by ≤ one poll, {} ms, + poll time), ∞ when not visible",
        options.deadline.as_millis(),
        options.poll.as_millis()
    );
    report::legend(&[
        "open loop, 200 fresh even ids per callback (all online, all must be stored), upstream 0–5 ms",
        "accepted ids/s over the step's send window; non-2xx include 503 past pipeline.max_pending_ids; errors: no answer within 5 s; not sent: 1024 requests were waiting",
        &deadline_line,
        "last_seen p99: last_seen − 202 read over the visible ids, a lower bound of the lag (last_seen is stamped when the upstream answers, before the commit)",
        "pass: accepted ≥ 95 % of target, visible ≥ 99.9 %, lag p99 ≤ 1 s; steps stop after the first failure",
        "service CPU: over the step and its drain, 100 % = one core; RSS at the step's end",
    ]);

    let check = match cluster {
        Some(_) => Check::new(
            "pipeline",
            "highest passing rate",
            format!("≥ {POSTGRES_TARGET_IDS_PER_S:.0} ids/s (lag p99 ≤ 1 s, ≥ 99.9 % visible)"),
            highest.map_or("none".into(), |rate| format!("{rate} ids/s")),
            Some(highest.is_some_and(|rate| rate as f64 >= POSTGRES_TARGET_IDS_PER_S)),
        ),
        None => Check::new(
            "pipeline",
            "highest passing rate",
            "none on SQLite (≥ 20000 ids/s is PostgreSQL's)",
            highest.map_or("none".into(), |rate| format!("{rate} ids/s")),
            None,
        ),
    };
    let json = json!({
        "scenario": "pipeline",
        "step_seconds": num(options.step.as_secs_f64()),
        "deadline_ms": options.deadline.as_millis() as u64,
        "poll_ms": options.poll.as_millis() as u64,
        "steps": steps.iter().map(StepResult::json).collect::<Vec<_>>(),
        "highest_passing_ids_per_s": highest,
        "rss_peak_mb": rss_peak.map(to_mb).map(num),
        "polls": polls,
        "poll_errors": poll_errors,
    });
    Ok(Outcome {
        json,
        checks: vec![check],
        figure: Some(figure(&steps, options.deadline)),
    })
}

/// Per step (x = its target rate): lag p50/p99/max, and the accepted rate.
fn figure(steps: &[StepResult], deadline: Duration) -> Figure {
    let deadline_ms = deadline.as_secs_f64() * 1_000.0;
    let x = "target rate (ids/s)";
    // An id never seen has an infinite lag: drawn at the deadline, and the legend says so.
    let lag = |name: &str, p: f64| {
        let points: Vec<(f64, f64)> = steps
            .iter()
            .map(|step| {
                (
                    step.target as f64,
                    report::percentile(&step.figures.lags_ms, p),
                )
            })
            .collect();
        let clamped = points.iter().any(|(_, lag)| lag.is_infinite());
        let name = if clamped {
            format!("{name} (not visible: drawn at the {deadline_ms:.0} ms deadline)")
        } else {
            name.to_owned()
        };
        let points = points
            .into_iter()
            .map(|(x, lag)| (x, if lag.is_infinite() { deadline_ms } else { lag }))
            .collect();
        Series::new(name, points)
    };
    let rate = |f: fn(&StepResult) -> f64| steps.iter().map(|s| (s.target as f64, f(s))).collect();
    Figure {
        file: "pipeline.svg",
        charts: vec![
            Chart::new(
                "pipeline: visibility lag per rate step (202 read → first poll showing the id)",
                x,
                "visibility lag (ms)",
                vec![lag("p50", 50.0), lag("p99", 99.0), lag("max", 100.0)],
            ),
            Chart::new(
                "pipeline: accepted rate per step (open loop, 200 fresh ids per callback)",
                x,
                "ids/s",
                vec![
                    Series::new("target", rate(|s| s.target as f64)),
                    Series::new("accepted", rate(StepResult::accepted_per_s)),
                ],
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn posted(answer: Answer, answered_us: i64) -> Posted {
        Posted {
            answer,
            sent_us: answered_us - 1_000,
            answered_us,
            sent: Instant::now(),
            latency: Duration::from_millis(1),
        }
    }

    fn row(id: i64, last_seen_us: i64) -> Row {
        Row {
            id,
            last_seen_us,
            expires_us: last_seen_us + 30_000_000,
        }
    }

    #[test]
    fn ids_are_fresh_even_and_unique_across_callbacks() {
        let mut ledger = Ledger::default();
        let (a, body_a) = ledger.open();
        let (b, body_b) = ledger.open();
        assert_eq!((a, b), (0, 1));
        assert!(body_a.starts_with(r#"{"object_ids":[0,2,4,"#), "{body_a}");
        assert!(body_a.ends_with(",398]}"), "{body_a}");
        assert!(body_b.starts_with(r#"{"object_ids":[400,402,"#), "{body_b}");
        assert_eq!(ledger.seen_us.len(), 400);
    }

    #[test]
    fn lag_counts_from_the_ack_and_unseen_ids_count_as_infinite() {
        let mut ledger = Ledger::default();
        let (a, _) = ledger.open();
        let (b, _) = ledger.open();
        let (c, _) = ledger.open();
        ledger.answer(a, &posted(Answer::Accepted, 1_000_000));
        ledger.answer(b, &posted(Answer::Refused(503), 1_000_000));
        ledger.answer(c, &posted(Answer::Accepted, 2_000_000));
        // Every id of `a` shows up 20 ms after its ack; `c`'s last id never does, one is
        // late, and one is seen before the ack was read (counts as 0).
        let rows_a: Vec<Row> = (0..200).map(|j| row(2 * j, 1_005_000)).collect();
        ledger.record(&rows_a, 1_020_000);
        let rows_c: Vec<Row> = (400..599).map(|j| row(2 * j, 1_999_000)).collect();
        ledger.record(&rows_c[..1], 1_999_000);
        ledger.record(&rows_c[1..198], 2_500_000);
        ledger.record(&rows_c[198..], 9_000_000);
        // Odd and unknown ids are ignored.
        ledger.record(&[row(3, 1), row(1_000_000, 1)], 2_000_000);

        let figures = ledger.step(0..3, 5_000_000);
        assert_eq!(figures.accepted_callbacks, 2);
        assert_eq!(figures.non_2xx, 1);
        assert_eq!(figures.accepted_ids, 400);
        assert_eq!(figures.visible, 398);
        assert!((figures.visible_percent() - 99.5).abs() < 1e-9);
        assert_eq!(figures.lags_ms[0], 0.0, "seen before the ack");
        assert_eq!(report::percentile(&figures.lags_ms, 25.0), 20.0);
        assert_eq!(report::percentile(&figures.lags_ms, 75.0), 500.0);
        assert_eq!(figures.lags_ms[399], f64::INFINITY);
        assert_eq!(
            figures.fetched_lags_ms[0], -1.0,
            "last_seen may precede the ack"
        );
        assert!(
            !figures.passes(10.0, Duration::from_secs(1)),
            "99.5 % < 99.9 %"
        );
    }

    #[test]
    fn a_step_passes_only_at_the_rate_with_everything_visible_within_a_second() {
        let figures = |lag_ms: f64, accepted_ids: u64| StepFigures {
            accepted_ids,
            visible: accepted_ids,
            lags_ms: vec![lag_ms; accepted_ids as usize],
            ..StepFigures::default()
        };
        let window = Duration::from_secs(2);
        assert!(figures(900.0, 2_000).passes(1_000.0, window));
        assert!(!figures(1_100.0, 2_000).passes(1_000.0, window), "lag");
        assert!(
            !figures(900.0, 1_800).passes(1_000.0, window),
            "90 % of the rate"
        );
        assert!(
            !figures(900.0, 0).passes(1_000.0, window),
            "nothing accepted"
        );
    }

    #[test]
    fn settling_waits_for_answers_and_gives_up_after_the_deadline() {
        let mut ledger = Ledger::default();
        let (a, _) = ledger.open();
        let (b, _) = ledger.open();
        let (_c, _) = ledger.open();
        ledger.settle(0, 5_000_000);
        assert_eq!(ledger.low, 0, "no answer yet");
        ledger.answer(a, &posted(Answer::Accepted, 1_000_000));
        ledger.answer(b, &posted(Answer::Failed, 1_000_000));
        let rows: Vec<Row> = (0..100).map(|j| row(2 * j, 1_001_000)).collect();
        ledger.record(&rows, 1_010_000);
        ledger.settle(1_010_000, 5_000_000);
        assert_eq!(
            ledger.low, 100,
            "stops at the first unseen id of an accepted callback"
        );
        ledger.settle(6_000_001, 5_000_000);
        assert_eq!(
            ledger.low, 400,
            "past the deadline, then the failed callback, then c"
        );
    }
}
