//! Fault injection, end to end: the real `callback-service` against a fake upstream that
//! misbehaves on cue, a PostgreSQL reached through a proxy the test cuts, a SQLite file
//! another connection holds locked, a full disk (the service's file size limit lowered
//! with `prlimit`), and a flood above capacity.
//!
//! For every fault the test checks what a user sees over HTTP: the service does not crash
//! (it keeps answering), no request hangs past its timeout (every test and every request
//! is bounded), every id answered `202` ends in a recorded outcome (stored, or listed by
//! `GET /failures` with its code and reason, nothing left pending), and health names the
//! database when that is what failed.
//!
//! Upstream faults and overload do not depend on the backend and run on SQLite; the
//! database faults run on the backend they concern.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use serde_json::{Value, json};
use tests::{
    Backend, Database, Proxy, Service, eventually, http, now_micros, parse_rfc3339_micros,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The bound on a whole test: a hang fails the test instead of stalling the run.
const TEST_DEADLINE: Duration = Duration::from_secs(90);
/// How long an outcome may take to show once nothing holds it up any more.
const WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(10);
/// How often to read every outcome (several requests, every stored object).
const SETTLE_POLL: Duration = Duration::from_millis(25);
const TTL: Duration = Duration::from_secs(600);

/// Short upstream timeouts so that every upstream fault plays out within about a second,
/// and a retry horizon as short as the in-process retries: an id whose fetch still fails
/// transiently after them is a dead letter at once, with the cause these cases check
/// (the durable retry schedule itself is `outage.rs`'s subject).
const FAST_FAULTS: &[(&str, &str)] = &[
    ("CALLBACK_UPSTREAM__REQUEST_TIMEOUT_MS", "300"),
    ("CALLBACK_UPSTREAM__CONNECT_TIMEOUT_MS", "200"),
    ("CALLBACK_UPSTREAM__RETRY_DEADLINE_MS", "1000"),
    ("CALLBACK_UPSTREAM__RETRY_HORIZON_MS", "1000"),
    ("CALLBACK_PIPELINE__LEASE_MS", "3000"),
    ("CALLBACK_PIPELINE__POLL_INTERVAL_MS", "100"),
];

/// The retry deadline [`FAST_FAULTS`] sets.
const RETRY_DEADLINE: Duration = Duration::from_secs(1);

/// [`FAST_FAULTS`] with `extra` on top (later settings win).
fn settings<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    FAST_FAULTS.iter().chain(extra).copied().collect()
}

/// Runs `test` within [`TEST_DEADLINE`], and says how long it took.
async fn bounded(test: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tests::bounded(TEST_DEADLINE, test).await
}

// ---------------------------------------------------------------------------------------
// A fake upstream that answers each request as a script says.

/// What the fake upstream does with one request.
#[derive(Debug, Clone)]
enum Reply {
    /// `200 {"id":…,"online":…}`.
    Object { id: i64, online: bool },
    /// This status with an empty body, and a `Retry-After` if given.
    Status {
        status: u16,
        retry_after: Option<&'static str>,
    },
    /// `200` with this body, whatever it is.
    Body(String),
    /// The reply after a delay: the fake is slow (it gives up if the client hangs up).
    Late(Duration, Box<Reply>),
    /// `200` headers announcing a body, part of it, a stall, then a TCP reset.
    ResetMidBody,
}

impl Reply {
    fn online(id: i64) -> Self {
        Reply::Object { id, online: true }
    }

    fn late(delay: Duration, reply: Reply) -> Self {
        Reply::Late(delay, Box::new(reply))
    }
}

/// Decides the reply to the `attempt`th request (1-based) about `id`.
type Script = dyn Fn(i64, usize) -> Reply + Send + Sync;

/// What the fake upstream has seen.
#[derive(Debug, Default)]
struct Seen {
    connections: AtomicUsize,
    peak_connections: AtomicUsize,
    requests: AtomicUsize,
    peak_requests: AtomicUsize,
    /// When each request about each id arrived.
    asked: Mutex<BTreeMap<i64, Vec<Instant>>>,
}

/// Counts one of something while it lives, and keeps the peak.
struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    fn enter(now: &'a AtomicUsize, peak: &AtomicUsize) -> Self {
        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
        peak.fetch_max(n, Ordering::SeqCst);
        Self(now)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// HTTP/1.1 with keep-alive on a free loopback port; stops (every connection) when dropped.
struct FakeUpstream {
    addr: SocketAddr,
    seen: Arc<Seen>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl FakeUpstream {
    async fn start(
        script: impl Fn(i64, usize) -> Reply + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Seen::default());
        let script: Arc<Script> = Arc::new(script);
        let (stop, stopped) = watch::channel(false);
        let accept = tokio::spawn({
            let seen = Arc::clone(&seen);
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (seen, script, mut stopped) =
                        (Arc::clone(&seen), Arc::clone(&script), stopped.clone());
                    tokio::spawn(async move {
                        let _open = Gauge::enter(&seen.connections, &seen.peak_connections);
                        tokio::select! {
                            _ = exchange(stream, &*script, &seen) => {}
                            _ = stopped.wait_for(|stop| *stop) => {}
                        }
                    });
                }
            }
        });
        Ok(Self {
            addr,
            seen,
            stop,
            accept,
        })
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// When each request about `id` arrived.
    fn attempts(&self, id: i64) -> Vec<Instant> {
        let asked = self.seen.asked.lock().expect("asked lock");
        asked.get(&id).cloned().unwrap_or_default()
    }

    /// How many requests it has had.
    fn requests_seen(&self) -> usize {
        let asked = self.seen.asked.lock().expect("asked lock");
        asked.values().map(Vec::len).sum()
    }

    fn peak_connections(&self) -> usize {
        self.seen.peak_connections.load(Ordering::SeqCst)
    }

    fn peak_requests(&self) -> usize {
        self.seen.peak_requests.load(Ordering::SeqCst)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.accept.abort();
    }
}

/// Serves the requests of one connection until the client closes it or a reply ends it.
async fn exchange(stream: TcpStream, script: &Script, seen: &Seen) -> anyhow::Result<()> {
    let mut conn = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        loop {
            let mut header = String::new();
            if conn.read_line(&mut header).await? == 0 {
                return Ok(());
            }
            if header.trim_end().is_empty() {
                break;
            }
        }
        let id: i64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|path| path.strip_prefix("/objects/"))
            .and_then(|id| id.parse().ok())
            .with_context(|| format!("not a GET /objects/{{id}}: {line:?}"))?;
        let _busy = Gauge::enter(&seen.requests, &seen.peak_requests);
        let attempt = {
            let mut asked = seen.asked.lock().expect("asked lock");
            let times = asked.entry(id).or_default();
            times.push(Instant::now());
            times.len()
        };
        let mut reply = script(id, attempt);
        loop {
            match reply {
                Reply::Late(delay, then) => {
                    if !still_there_after(&mut conn, delay).await {
                        return Ok(()); // the client gave up
                    }
                    reply = *then;
                }
                Reply::Object { id, online } => {
                    let body = json!({ "id": id, "online": online }).to_string();
                    conn.write_all(response(200, "", &body).as_bytes()).await?;
                    break;
                }
                Reply::Status {
                    status,
                    retry_after,
                } => {
                    let extra = retry_after
                        .map(|value| format!("retry-after: {value}\r\n"))
                        .unwrap_or_default();
                    conn.write_all(response(status, &extra, "").as_bytes())
                        .await?;
                    break;
                }
                Reply::Body(body) => {
                    conn.write_all(response(200, "", &body).as_bytes()).await?;
                    break;
                }
                Reply::ResetMidBody => {
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                content-length: 64\r\n\r\n{\"id\":";
                    conn.write_all(head.as_bytes()).await?;
                    conn.flush().await?;
                    // The fault: the answer stalls half way, then the connection breaks.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = conn.get_ref().set_zero_linger();
                    return Ok(());
                }
            }
        }
    }
}

/// Waits `delay`; false if the client hung up meanwhile.
async fn still_there_after(conn: &mut BufReader<TcpStream>, delay: Duration) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    tokio::select! {
        () = &mut sleep => true,
        read = conn.fill_buf() => match read {
            Ok(bytes) if !bytes.is_empty() => {
                sleep.await;
                true
            }
            _ => false,
        },
    }
}

fn response(status: u16, extra_headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} Fake\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
}

/// An address on 127.0.0.1 where nothing listens: connecting is refused.
async fn refusing_addr() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    listener.local_addr().map_err(Into::into)
}

// ---------------------------------------------------------------------------------------
// What the service answers.

/// One answer of the service.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
    took: Duration,
}

impl Answer {
    async fn read(request: reqwest::RequestBuilder) -> anyhow::Result<Self> {
        let started = Instant::now();
        let response = request.send().await?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Self {
            status,
            retry_after,
            body,
            took: started.elapsed(),
        })
    }

    /// Checks that this is a `503` with `Retry-After` and the error envelope.
    fn ensure_unavailable(&self, what: &str) -> anyhow::Result<()> {
        ensure!(self.status == 503, "{what}: expected 503, got {self:?}");
        let retry_after = self
            .retry_after
            .as_deref()
            .with_context(|| format!("{what}: 503 without Retry-After: {self:?}"))?;
        ensure!(
            retry_after.parse::<u64>().is_ok_and(|secs| secs >= 1),
            "{what}: Retry-After is not a number of seconds: {retry_after:?}"
        );
        ensure!(
            self.body["error"] == "unavailable",
            "{what}: not the error envelope: {}",
            self.body
        );
        ensure!(
            self.body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: the envelope says nothing: {}",
            self.body
        );
        Ok(())
    }

    /// Checks that this is health's `503` naming the database as down.
    fn ensure_database_down(&self, what: &str) -> anyhow::Result<()> {
        self.ensure_unavailable(what)?;
        ensure!(
            self.body["components"]["database"]["status"] == "down",
            "{what}: health does not name the database: {}",
            self.body
        );
        Ok(())
    }
}

async fn post_ids(
    client: &reqwest::Client,
    service: &Service,
    ids: &[i64],
) -> anyhow::Result<Answer> {
    Answer::read(
        client
            .post(service.url("/callback"))
            .json(&json!({ "object_ids": ids })),
    )
    .await
}

async fn health(service: &Service) -> anyhow::Result<Answer> {
    Answer::read(http().get(service.url("/"))).await
}

async fn admin_json(service: &Service, path: &str) -> anyhow::Result<Value> {
    let response = http().get(service.admin_url(path)).send().await?;
    let status = response.status();
    let body: Value = response.json().await?;
    ensure!(status == 200, "GET {path} answered {status}: {body}");
    Ok(body)
}

/// The newest failure record of each id `GET /failures` lists.
async fn failures(service: &Service) -> anyhow::Result<BTreeMap<i64, Value>> {
    let body = admin_json(service, "/failures").await?;
    let mut by_id = BTreeMap::new();
    for failure in body["failures"].as_array().into_iter().flatten() {
        let id = failure["id"]
            .as_i64()
            .with_context(|| format!("a failure without an id: {failure}"))?;
        by_id.entry(id).or_insert_with(|| failure.clone());
    }
    Ok(by_id)
}

async fn is_stored(service: &Service, id: i64) -> anyhow::Result<bool> {
    let response = http()
        .get(service.url(&format!("/objects/{id}")))
        .send()
        .await?;
    match response.status().as_u16() {
        200 => Ok(true),
        404 => Ok(false),
        other => bail!(
            "GET /objects/{id} answered {other}: {}",
            response.text().await?
        ),
    }
}

/// Every id `GET /objects` lists, page by page.
async fn stored_ids(service: &Service) -> anyhow::Result<BTreeSet<i64>> {
    let mut found = BTreeSet::new();
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(after) => format!("/objects?limit=10000&after={after}"),
            None => "/objects?limit=10000".to_owned(),
        };
        let response = http().get(service.url(&path)).send().await?;
        let status = response.status();
        let page: Value = response.json().await?;
        ensure!(status == 200, "GET {path} answered {status}: {page}");
        found.extend(
            page["objects"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|o| o["id"].as_i64()),
        );
        match page["next_after"].as_i64() {
            Some(next) => after = Some(next),
            None => return Ok(found),
        }
    }
}

/// The value of an unlabelled counter on `GET /metrics`.
async fn counter(service: &Service, name: &str) -> anyhow::Result<f64> {
    let text = http()
        .get(service.admin_url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .filter_map(|value| value.trim().parse::<f64>().ok())
        .sum())
}

/// The resident memory of a process, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("no VmRSS line")?
        .parse()?;
    Ok(kib * 1024)
}

/// Where an accepted id must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Stored,
    Failed(&'static str),
}

/// Waits until every id has reached its outcome and nothing is pending, checks that it
/// reached only that one, and returns the failure records by id.
async fn settled(
    service: &Service,
    expected: &[(i64, Outcome)],
) -> anyhow::Result<BTreeMap<i64, Value>> {
    let reached = |failures: &BTreeMap<i64, Value>, stored: &BTreeSet<i64>| {
        expected.iter().all(|(id, outcome)| match outcome {
            Outcome::Stored => stored.contains(id),
            Outcome::Failed(code) => failures.get(id).is_some_and(|f| f["code"] == *code),
        })
    };
    let waited = eventually(WAIT, SETTLE_POLL, || async {
        let stats = admin_json(service, "/stats").await?;
        if stats["pending_ids"] != 0 {
            return Ok(None);
        }
        let failures = failures(service).await?;
        let stored = stored_ids(service).await?;
        Ok(reached(&failures, &stored).then_some((failures, stored)))
    })
    .await;
    let (failures, stored) = match waited {
        Ok(found) => found,
        Err(err) => {
            let stats = admin_json(service, "/stats").await?;
            let failures = failures(service).await?;
            let stored = stored_ids(service).await?;
            bail!(
                "{err}: expected {expected:?}; stored {stored:?}; failures {:?}; stats {stats}",
                failures.values().collect::<Vec<_>>()
            );
        }
    };
    for (id, outcome) in expected {
        match outcome {
            Outcome::Stored => ensure!(
                !failures.contains_key(id),
                "{id} was stored and also recorded as failed: {}",
                failures[id]
            ),
            Outcome::Failed(_) => ensure!(
                !stored.contains(id),
                "{id} was recorded as failed and also stored"
            ),
        }
    }
    Ok(failures)
}

/// Checks a failure record: `{id, code, reason, at}` with a reason that mentions every
/// one of `mentions`, recorded after `sent_at` and no later than the retry deadline
/// (plus slack for a busy machine) after it: a fault does not hang an id.
fn check_failure(
    failure: &Value,
    sent_at: i64,
    retry_deadline: Duration,
    mentions: &[&str],
) -> anyhow::Result<()> {
    const SLACK: Duration = Duration::from_secs(3);
    let reason = failure["reason"].as_str().unwrap_or_default();
    ensure!(!reason.is_empty(), "a failure without a reason: {failure}");
    for mention in mentions {
        ensure!(
            reason.to_lowercase().contains(&mention.to_lowercase()),
            "the reason does not mention {mention:?}: {failure}"
        );
    }
    let at = parse_rfc3339_micros(failure["at"].as_str().unwrap_or_default())?;
    ensure!(
        sent_at <= at,
        "failed at {at}, before it was sent at {sent_at}: {failure}"
    );
    let took = Duration::from_micros(u64::try_from(at - sent_at)?);
    ensure!(
        took <= retry_deadline + SLACK,
        "recorded {took:?} after the callback, past the retry deadline of {retry_deadline:?}: \
         {failure}"
    );
    Ok(())
}

/// Waits until `healthy` is stored and checks that `faulty` had not failed yet by then:
/// the faulty id, still being retried, did not hold the healthy one up.
async fn stored_while_still_retrying(
    service: &Service,
    healthy: i64,
    faulty: i64,
) -> anyhow::Result<()> {
    eventually(WAIT, POLL, || async {
        // Stored first, failures second: a pass means stored before the failure.
        if !is_stored(service, healthy).await? {
            return Ok(None);
        }
        let failures = failures(service).await?;
        ensure!(
            !failures.contains_key(&faulty),
            "{healthy} was stored only after {faulty} had already failed: {}",
            failures[&faulty]
        );
        Ok(Some(()))
    })
    .await
}

/// Checks that the service is alive and its database fine, and returns the health body.
async fn healthy(service: &Service) -> anyhow::Result<Value> {
    let answer = health(service).await?;
    ensure!(answer.status == 200, "health: {answer:?}");
    Ok(answer.body)
}

async fn start_on_sqlite(upstream: &str, env: &[(&str, &str)]) -> anyhow::Result<Service> {
    Service::start(Backend::Sqlite, upstream, TTL, env)
        .await?
        .context("sqlite is always available")
}

/// Posts `ids` once and checks the `202`; returns when it was sent.
async fn accept(service: &Service, ids: &[i64]) -> anyhow::Result<i64> {
    let sent_at = now_micros();
    let answer = post_ids(&http(), service, ids).await?;
    ensure!(answer.status == 202, "callback {ids:?}: {answer:?}");
    ensure!(
        answer.body["accepted"] == ids.len(),
        "callback {ids:?}: {answer:?}"
    );
    Ok(sent_at)
}

// ---------------------------------------------------------------------------------------
// Upstream faults (SQLite).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_ids_are_retried_then_recorded_as_unreachable() -> anyhow::Result<()> {
    bounded(async {
        let refusing = refusing_addr().await?;
        let service = start_on_sqlite(&format!("http://{refusing}"), FAST_FAULTS).await?;

        let sent_at = accept(&service, &[1, 2]).await?;
        let failures = settled(
            &service,
            &[
                (1, Outcome::Failed("unreachable")),
                (2, Outcome::Failed("unreachable")),
            ],
        )
        .await?;
        for id in [1, 2] {
            check_failure(&failures[&id], sent_at, RETRY_DEADLINE, &["refused"])?;
        }
        let retries = counter(&service, "upstream_retries_total").await?;
        ensure!(
            retries >= 2.0,
            "connect errors are retried: {retries} retries"
        );
        let body = healthy(&service).await?;
        ensure!(body["pipeline"]["failed"] == 2, "{body}");
        // Still 200 (callbacks are accepted), but the failing component is named.
        ensure!(
            body["components"]["upstream"]["status"] == "failing",
            "{body}"
        );
        ensure!(
            body["components"]["upstream"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("refused")),
            "{body}"
        );
        Ok(())
    })
    .await
}

/// One retried upstream fault, end to end: ids `base` (faulty on every attempt), `base + 1`
/// (faulty on the first attempt only) and `base + 2` (healthy), in one callback. The healthy
/// id is stored while the faulty one is still retried; the once-faulty id ends stored after
/// exactly two attempts; the faulty id ends failed with `code` and a reason naming `words`,
/// recorded within `deadline` (the retry deadline `env` sets) after at least two attempts.
/// Returns the fake and the faulty id, for the checks of the case.
async fn retried_fault(
    base: i64,
    fault: impl Fn(i64) -> Reply + Send + Sync + 'static,
    env: &[(&str, &str)],
    deadline: Duration,
    code: &'static str,
    words: &[&str],
) -> anyhow::Result<FakeUpstream> {
    let (always, once, fine) = (base, base + 1, base + 2);
    let upstream = FakeUpstream::start(move |id, attempt| {
        if id == always || (id == once && attempt == 1) {
            fault(id)
        } else {
            Reply::online(id)
        }
    })
    .await?;
    let service = start_on_sqlite(&upstream.base_url(), env).await?;

    let sent_at = accept(&service, &[always, once, fine]).await?;
    stored_while_still_retrying(&service, fine, always).await?;
    let failures = settled(
        &service,
        &[
            (always, Outcome::Failed(code)),
            (once, Outcome::Stored),
            (fine, Outcome::Stored),
        ],
    )
    .await?;
    check_failure(&failures[&always], sent_at, deadline, words)?;
    let attempts = upstream.attempts(always).len();
    ensure!(attempts >= 2, "{code}: retried, yet {attempts} attempt(s)");
    let attempts = upstream.attempts(once).len();
    ensure!(
        attempts == 2,
        "{code}: once-faulty id asked {attempts} times"
    );
    healthy(&service).await?;
    Ok(upstream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_slow_past_the_timeout_is_retried_then_recorded_as_timeout() -> anyhow::Result<()>
{
    bounded(async {
        let slow = |id| Reply::late(Duration::from_secs(5), Reply::online(id));
        retried_fault(10, slow, FAST_FAULTS, RETRY_DEADLINE, "timeout", &["300ms"]).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_5xx_is_retried_then_recorded_with_its_status() -> anyhow::Result<()> {
    bounded(async {
        let broken = |_| Reply::Status {
            status: 503,
            retry_after: None,
        };
        retried_fault(20, broken, FAST_FAULTS, RETRY_DEADLINE, "status", &["503"]).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_429_is_retried_after_its_retry_after_then_recorded() -> anyhow::Result<()> {
    bounded(async {
        let too_many = |_| Reply::Status {
            status: 429,
            retry_after: Some("1"),
        };
        // Room for one retry after the one second the upstream asks for.
        let env = settings(&[("CALLBACK_UPSTREAM__RETRY_DEADLINE_MS", "2000")]);
        let deadline = Duration::from_secs(2);
        let upstream = retried_fault(30, too_many, &env, deadline, "status", &["429"]).await?;
        for id in [30, 31] {
            let attempts = upstream.attempts(id);
            let waited = attempts[1] - attempts[0];
            ensure!(
                waited >= Duration::from_secs(1),
                "{id}: retried {waited:?} after a 429 that asked for 1 s"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_garbage_bodies_are_recorded_as_malformed_without_retries() -> anyhow::Result<()> {
    bounded(async {
        let (html, huge, incomplete, array, fine) = (40, 41, 42, 43, 44);
        let upstream = FakeUpstream::start(move |id, _| match id {
            _ if id == html => Reply::Body("<html>oops</html>".to_owned()),
            // Past the 64 KiB cap, however valid the JSON.
            _ if id == huge => Reply::Body(
                json!({ "id": id, "online": true, "pad": "x".repeat(100 * 1024) }).to_string(),
            ),
            _ if id == incomplete => Reply::Body(json!({ "id": id }).to_string()),
            _ if id == array => Reply::Body(json!([id, true]).to_string()),
            _ => Reply::online(id),
        })
        .await?;
        let service = start_on_sqlite(&upstream.base_url(), FAST_FAULTS).await?;

        let ids = [html, huge, incomplete, array, fine];
        let sent_at = accept(&service, &ids).await?;
        let failures = settled(
            &service,
            &[
                (html, Outcome::Failed("malformed")),
                (huge, Outcome::Failed("malformed")),
                (incomplete, Outcome::Failed("malformed")),
                (array, Outcome::Failed("malformed")),
                (fine, Outcome::Stored),
            ],
        )
        .await?;
        check_failure(&failures[&html], sent_at, RETRY_DEADLINE, &["<html>"])?;
        check_failure(&failures[&huge], sent_at, RETRY_DEADLINE, &["65536"])?;
        check_failure(&failures[&incomplete], sent_at, RETRY_DEADLINE, &["online"])?;
        check_failure(&failures[&array], sent_at, RETRY_DEADLINE, &[])?;
        for id in ids {
            let attempts = upstream.attempts(id).len();
            ensure!(
                attempts == 1,
                "{id}: asked {attempts} times; a bad answer is not retried"
            );
        }
        healthy(&service).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answer_about_another_id_is_recorded_as_id_mismatch() -> anyhow::Result<()> {
    bounded(async {
        let (asked, answered, fine) = (50, 51, 52);
        let upstream = FakeUpstream::start(move |id, _| match id {
            _ if id == asked => Reply::online(answered),
            _ => Reply::online(id),
        })
        .await?;
        let service = start_on_sqlite(&upstream.base_url(), FAST_FAULTS).await?;

        let sent_at = accept(&service, &[asked, fine]).await?;
        let failures = settled(
            &service,
            &[
                (asked, Outcome::Failed("id_mismatch")),
                (fine, Outcome::Stored),
            ],
        )
        .await?;
        check_failure(&failures[&asked], sent_at, RETRY_DEADLINE, &["50", "51"])?;
        ensure!(
            !is_stored(&service, answered).await?,
            "the id the upstream answered about must not be stored either"
        );
        ensure!(upstream.attempts(asked).len() == 1, "not retried");
        healthy(&service).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_body_is_retried_then_recorded_as_unreachable() -> anyhow::Result<()> {
    bounded(async {
        let reset = |_| Reply::ResetMidBody;
        retried_fault(60, reset, FAST_FAULTS, RETRY_DEADLINE, "unreachable", &[]).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_stay_within_max_in_flight() -> anyhow::Result<()> {
    bounded(async {
        const MAX_IN_FLIGHT: usize = 4;
        let upstream =
            FakeUpstream::start(|id, _| Reply::late(Duration::from_millis(100), Reply::online(id)))
                .await?;
        let env = settings(&[("CALLBACK_UPSTREAM__MAX_IN_FLIGHT", "4")]);
        let service = start_on_sqlite(&upstream.base_url(), &env).await?;

        let ids: Vec<i64> = (100..160).collect();
        accept(&service, &ids[..30]).await?;
        accept(&service, &ids[30..]).await?;
        let expected: Vec<(i64, Outcome)> = ids.iter().map(|&id| (id, Outcome::Stored)).collect();
        settled(&service, &expected).await?;

        let (requests, connections) = (upstream.peak_requests(), upstream.peak_connections());
        eprintln!("upstream peaks: {requests} requests, {connections} connections in flight");
        ensure!(
            requests == MAX_IN_FLIGHT,
            "the fetches should fill but not pass max_in_flight: peak {requests} requests"
        );
        ensure!(
            connections <= MAX_IN_FLIGHT,
            "{connections} upstream connections open at once, more than max_in_flight {MAX_IN_FLIGHT}"
        );
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Database faults.

/// Where a `postgres://` url's server listens.
fn server_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let parsed = reqwest::Url::parse(url)?;
    parsed
        .socket_addrs(|| Some(5432))?
        .into_iter()
        .next()
        .with_context(|| format!("no address for {}", parsed.host_str().unwrap_or_default()))
}

/// Settings for the database tests: a short wait for the database, and an upstream that
/// takes a while, so that work is pending when the database goes away.
const DATABASE_FAULTS: &[(&str, &str)] = &[
    ("CALLBACK_DATABASE__CONNECT_TIMEOUT_MS", "1000"),
    ("CALLBACK_DATABASE__WAIT_TIMEOUT_MS", "1000"),
    ("CALLBACK_UPSTREAM__REQUEST_TIMEOUT_MS", "2000"),
    ("CALLBACK_UPSTREAM__RETRY_DEADLINE_MS", "3000"),
    ("CALLBACK_PIPELINE__LEASE_MS", "5000"),
    ("CALLBACK_PIPELINE__POLL_INTERVAL_MS", "100"),
    ("CALLBACK_UPSTREAM__MAX_IN_FLIGHT", "8"),
];

/// Even ids online, odd ids offline, each after `delay`.
async fn even_online_upstream(delay: Duration) -> anyhow::Result<FakeUpstream> {
    FakeUpstream::start(move |id, _| {
        Reply::late(
            delay,
            Reply::Object {
                id,
                online: id % 2 == 0,
            },
        )
    })
    .await
}

/// Waits until every id of `acked` is settled: the even ones stored (seen by the service
/// and in the table itself), the odd ones not, nothing pending, nothing failed.
async fn all_settled(service: &Service, acked: &BTreeSet<i64>) -> anyhow::Result<()> {
    let even: BTreeSet<i64> = acked.iter().copied().filter(|id| id % 2 == 0).collect();
    let waited = eventually(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let stats = admin_json(service, "/stats").await?;
            let stored = stored_ids(service).await?;
            Ok((stats["pending_ids"] == 0 && stored.is_superset(&even)).then_some(stored))
        },
    )
    .await;
    let stored = match waited {
        Ok(stored) => stored,
        Err(err) => {
            let stored = stored_ids(service).await?;
            let missing: Vec<_> = even.difference(&stored).take(20).collect();
            let stats = admin_json(service, "/stats").await?;
            bail!("{err}: accepted ids never stored (first 20): {missing:?}; stats {stats}");
        }
    };
    ensure!(
        stored == even,
        "stored {:?} besides the even accepted ids",
        stored.difference(&even).collect::<Vec<_>>()
    );
    let physical: BTreeSet<i64> = service.physical_ids().await?.into_iter().collect();
    ensure!(physical == even, "the table holds {physical:?}");
    let failures = failures(service).await?;
    ensure!(failures.is_empty(), "no id should fail: {failures:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lost_while_running_answers_503_then_resumes_the_accepted_work()
-> anyhow::Result<()> {
    bounded(async {
        let Some(db) = storage::testing::TestDatabase::create().await else {
            return Ok(()); // PostgreSQL not reachable and not required: skipped loudly
        };
        let proxy = Proxy::start(server_addr(&db.url)?).await?;
        let through_proxy = proxy.url_through(&db.url)?;
        let upstream = even_online_upstream(Duration::from_millis(200)).await?;
        let service = Service::start_with(
            Database::Postgres(db),
            &through_proxy,
            &upstream.base_url(),
            TTL,
            DATABASE_FAULTS,
        )
        .await?;
        let client = http();
        let mut acked = BTreeSet::new();

        // 80 ids at 8 in flight and 200 ms each: work for two seconds; the database goes
        // away once the first fetches are under way.
        let before: Vec<i64> = (0..80).collect();
        accept(&service, &before).await?;
        acked.extend(&before);
        eventually(WAIT, Duration::from_millis(1), || async {
            Ok((upstream.requests_seen() > 0).then_some(()))
        })
        .await?;
        proxy.cut();

        for round in 0..5_i64 {
            let ids: Vec<i64> = (1_000 + round * 10..1_010 + round * 10).collect();
            let answer = post_ids(&client, &service, &ids).await?;
            ensure!(
                answer.status != 202,
                "callback {ids:?} answered 202 while the database was cut off: {answer:?}"
            );
            answer.ensure_unavailable(&format!("callback during the outage, round {round}"))?;
            ensure!(
                answer.took < Duration::from_secs(5),
                "the 503 took {:?}",
                answer.took
            );
        }
        let answer = health(&service).await?;
        answer.ensure_database_down("health during the outage")?;
        // The probes: not ready (naming the database) but alive, so an orchestrator takes
        // the instance out of rotation without restarting it.
        eventually(WAIT, POLL, || async {
            let ready = Answer::read(http().get(service.url("/readyz"))).await?;
            Ok((ready.status == 503).then_some(ready))
        })
        .await
        .context("/readyz did not turn 503 while the database was cut")
        .and_then(|ready| {
            ensure!(
                ready.body["error"] == "not_ready" && ready.body["component"] == "database",
                "/readyz does not name the database: {}",
                ready.body
            );
            Ok(())
        })?;
        let live = Answer::read(http().get(service.url("/livez"))).await?;
        ensure!(
            live.status == 200 && live.body["status"] == "alive",
            "/livez must answer 200 while the database is cut: {live:?}"
        );
        // The fetches in flight finish meanwhile, and their outcomes cannot be written.
        eventually(WAIT, POLL, || async {
            let stats = admin_json(&service, "/stats").await?;
            let answered =
                stats["online"].as_u64().unwrap_or(0) + stats["offline"].as_u64().unwrap_or(0);
            Ok((answered > 0).then_some(()))
        })
        .await
        .context("no fetch finished during the outage")?;

        proxy.restore();
        eventually(WAIT, Duration::from_millis(50), || async {
            Ok((health(&service).await?.status == 200).then_some(()))
        })
        .await
        .context("health did not come back with the database")?;
        eventually(WAIT, POLL, || async {
            let ready = Answer::read(http().get(service.url("/readyz"))).await?;
            Ok((ready.status == 200).then_some(()))
        })
        .await
        .context("/readyz did not come back with the database")?;
        ensure!(
            proxy.open_connections() > 0,
            "the service reaches the database through the proxy"
        );
        let after: Vec<i64> = (2_000..2_010).collect();
        accept(&service, &after).await?;
        acked.extend(&after);
        all_settled(&service, &acked).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_at_start_serves_503_then_recovers_by_itself() -> anyhow::Result<()> {
    bounded(async {
        let Some(db) = storage::testing::TestDatabase::create().await else {
            return Ok(()); // PostgreSQL not reachable and not required: skipped loudly
        };
        let proxy = Proxy::start(server_addr(&db.url)?).await?;
        let through_proxy = proxy.url_through(&db.url)?;
        proxy.cut();
        let upstream = even_online_upstream(Duration::from_millis(1)).await?;
        let service = Service::start_with(
            Database::Postgres(db),
            &through_proxy,
            &upstream.base_url(),
            TTL,
            DATABASE_FAULTS,
        )
        .await
        .context(
            "the service must start and listen while PostgreSQL is unreachable, \
             retrying its migrations in the background",
        )?;

        let answer = health(&service).await?;
        answer.ensure_database_down("health before the database was ever reached")?;
        let answer = post_ids(&http(), &service, &[1, 2]).await?;
        ensure!(
            answer.status != 202,
            "a callback answered 202 before the database was ever reached: {answer:?}"
        );
        answer.ensure_unavailable("callback before the database was ever reached")?;
        // The storage adapter says, as a warning or an error, that it keeps trying.
        let lines = service.process.lines();
        ensure!(
            lines.iter().any(|l| {
                (l.contains(" WARN ") || l.contains(" ERROR "))
                    && l.contains("storage::")
                    && l.to_lowercase().contains("retry")
            }),
            "no log line says the database is retried in the background:\n{}",
            lines.join("\n")
        );

        proxy.restore();
        eventually(
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async { Ok((health(&service).await?.status == 200).then_some(())) },
        )
        .await
        .context("the service did not recover once the database was reachable")?;
        ensure!(
            proxy.open_connections() > 0,
            "the service reaches the database through the proxy"
        );
        // The database was created empty: storing proves the migrations ran meanwhile.
        let ids: Vec<i64> = (10..20).collect();
        accept(&service, &ids).await?;
        all_settled(&service, &ids.into_iter().collect()).await?;
        Ok(())
    })
    .await
}

/// Holds `BEGIN EXCLUSIVE` on the SQLite file at `path` from a second connection until
/// the returned sender is used or dropped; returns once the lock is held.
async fn lock_sqlite(
    path: &Path,
) -> anyhow::Result<(
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<anyhow::Result<()>>,
)> {
    use diesel::connection::SimpleConnection;
    use diesel::{Connection, SqliteConnection};

    let url = path.display().to_string();
    let (locked_tx, locked) = tokio::sync::oneshot::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || -> anyhow::Result<()> {
        let locking = (|| -> anyhow::Result<SqliteConnection> {
            let mut conn = SqliteConnection::establish(&url)?;
            conn.batch_execute("PRAGMA busy_timeout = 10000; BEGIN EXCLUSIVE;")?;
            Ok(conn)
        })();
        let mut conn = match locking {
            Ok(conn) => {
                let _ = locked_tx.send(Ok(()));
                conn
            }
            Err(err) => {
                let _ = locked_tx.send(Err(err));
                return Ok(());
            }
        };
        let _ = released.recv();
        conn.batch_execute("ROLLBACK;")?;
        Ok(())
    });
    locked.await.context("the lock holder died")??;
    Ok((release, holder))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_past_its_busy_timeout_answers_503_then_recovers() -> anyhow::Result<()> {
    bounded(async {
        let upstream = even_online_upstream(Duration::from_millis(1)).await?;
        let env = [
            ("CALLBACK_DATABASE__WAIT_TIMEOUT_MS", "1000"),
            ("CALLBACK_PIPELINE__POLL_INTERVAL_MS", "100"),
        ];
        let service = start_on_sqlite(&upstream.base_url(), &env).await?;
        let Database::Sqlite(path) = &*service.database else {
            bail!("started on sqlite");
        };
        let mut acked = BTreeSet::from([0, 2]);
        accept(&service, &[0, 2]).await?;
        all_settled(&service, &acked).await?;

        let (release, holder) = lock_sqlite(path).await?;
        // The service's busy timeout is 5 s; its wait for the write lock 1 s.
        tls::install_default_provider();
        let patient = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()?;
        let during = post_ids(&patient, &service, &[4, 6]).await;
        let health_during = health(&service).await;
        release.send(()).ok();
        holder
            .join()
            .map_err(|_| anyhow!("the lock holder panicked"))??;

        let during = during?;
        eprintln!(
            "callback while locked: {} after {:?}",
            during.status, during.took
        );
        ensure!(
            during.status != 202,
            "a callback answered 202 while the database file was locked: {during:?}"
        );
        during.ensure_unavailable("callback while the database file is locked")?;
        ensure!(
            during.took < Duration::from_secs(12),
            "the 503 took {:?}, past the busy timeout and the wait for the write lock",
            during.took
        );

        accept(&service, &[8, 10]).await?;
        acked.extend([8, 10]);
        all_settled(&service, &acked).await?;
        healthy(&service).await?;

        health_during?.ensure_database_down("health while the database file is locked")?;
        Ok(())
    })
    .await
}

/// The soft file size limit (RLIMIT_FSIZE) of process `pid`, as `/proc/<pid>/limits`
/// shows it: a number of bytes or `unlimited`.
fn file_size_limit(pid: u32) -> anyhow::Result<String> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max file size"))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .context("no file size line in /proc/<pid>/limits")
}

/// Sets the soft file size limit of process `pid` (`soft`: bytes or `unlimited`, at most
/// the hard limit) with util-linux's `prlimit`: past it, a write fails with EFBIG, as on a
/// full disk, and no privilege is needed to set it or to raise it back.
async fn set_file_size_limit(pid: u32, soft: &str) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--fsize={soft}:"))
        .status()
        .await
        .context("cannot run prlimit (util-linux)")?;
    ensure!(status.success(), "prlimit --fsize={soft}: {status}");
    ensure!(
        file_size_limit(pid)? == soft,
        "the limit did not change: {}",
        file_size_limit(pid)?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_disk_full_answers_503_then_recovers() -> anyhow::Result<()> {
    bounded(async {
        let upstream = even_online_upstream(Duration::from_millis(300)).await?;
        let env = [("CALLBACK_PIPELINE__POLL_INTERVAL_MS", "100")];
        let service = start_on_sqlite(&upstream.base_url(), &env).await?;
        let pid = service.process.pid().context("the service is running")?;
        let mut acked = BTreeSet::from([0, 2]);
        accept(&service, &[0, 2]).await?;
        all_settled(&service, &acked).await?;

        // 8 and 10 are accepted, then the disk fills up while they are being fetched:
        // their outcomes cannot be recorded until there is room again.
        accept(&service, &[8, 10]).await?;
        acked.extend([8, 10]);
        eventually(WAIT, POLL, || async {
            let in_flight = counter(&service, "fetches_in_flight").await?;
            Ok((in_flight >= 2.0).then_some(()))
        })
        .await
        .context("8 and 10 are not being fetched")?;
        let original = file_size_limit(pid)?;
        set_file_size_limit(pid, "1").await?;
        let during = post_ids(&http(), &service, &[4, 6]).await;
        let health_during = health(&service).await;
        let settling_failed = eventually(WAIT, POLL, || async {
            let failed = counter(&service, "store_errors_total{operation=\"complete\"}").await?;
            Ok((failed > 0.0).then_some(failed))
        })
        .await;
        let stored_during = stored_ids(&service).await;
        set_file_size_limit(pid, &original).await?;

        let during = during?;
        eprintln!(
            "callback while the disk is full: {} after {:?}",
            during.status, during.took
        );
        ensure!(
            during.status != 202,
            "a callback answered 202 while nothing could be written: {during:?}"
        );
        during.ensure_unavailable("callback while the disk is full")?;
        health_during?.ensure_database_down("health while the disk is full")?;
        let settling_failed = settling_failed.context("no failed settling of 8 and 10")?;
        eprintln!("settling attempts that failed while the disk was full: {settling_failed}");
        let stored_during = stored_during?;
        ensure!(
            !stored_during.contains(&8) && !stored_during.contains(&10),
            "8 or 10 stored while nothing could be written: {stored_during:?}"
        );
        let lines = service.process.lines();
        ensure!(
            lines.iter().any(|l| l.contains("file size limit")),
            "the cause is not logged"
        );
        ensure!(
            lines.iter().any(|l| l.contains("inbox write failed")),
            "the refused write is not logged"
        );

        // Room again: the outcomes waiting are recorded, callbacks are accepted again.
        accept(&service, &[4, 6]).await?;
        acked.extend([4, 6]);
        all_settled(&service, &acked).await?;
        healthy(&service).await?;
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Overload.

/// What the flood's posters saw.
#[derive(Debug, Default)]
struct Flood {
    acked: BTreeSet<i64>,
    refused: usize,
    slowest: Duration,
    peak_rss: u64,
    peak_pending: u64,
}

impl Flood {
    fn merge(&mut self, other: Flood) {
        self.acked.extend(other.acked);
        self.refused += other.refused;
        self.slowest = self.slowest.max(other.slowest);
        self.peak_rss = self.peak_rss.max(other.peak_rss);
        self.peak_pending = self.peak_pending.max(other.peak_pending);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_above_capacity_gets_fast_503s_in_bounded_memory_then_recovers()
-> anyhow::Result<()> {
    bounded(async {
        const POSTERS: usize = 16;
        const CALLBACKS_EACH: usize = 100;
        const IDS_EACH: i64 = 10;
        const MAX_PENDING_IDS: u64 = 20;
        const SLOW_ANSWER: Duration = Duration::from_secs(2);
        const RSS_BOUND: u64 = 200 * 1024 * 1024;

        // Capacity: 4 fetches of 50 ms at a time, 80 ids a second; the flood offers
        // thousands of ids a second.
        let upstream =
            FakeUpstream::start(|id, _| Reply::late(Duration::from_millis(50), Reply::online(id)))
                .await?;
        let env = settings(&[
            ("CALLBACK_PIPELINE__MAX_PENDING_IDS", "20"),
            ("CALLBACK_UPSTREAM__MAX_IN_FLIGHT", "4"),
        ]);
        let service = Arc::new(start_on_sqlite(&upstream.base_url(), &env).await?);
        let pid = service.process.pid().context("the service is running")?;
        let rss_before = rss_bytes(pid)?;

        let next_id = Arc::new(AtomicI64::new(0));
        let posters: Vec<JoinHandle<anyhow::Result<Flood>>> = (0..POSTERS)
            .map(|_| {
                let (service, next_id) = (Arc::clone(&service), Arc::clone(&next_id));
                tokio::spawn(async move {
                    let client = http();
                    let mut seen = Flood::default();
                    for n in 0..CALLBACKS_EACH {
                        let first = next_id.fetch_add(IDS_EACH, Ordering::Relaxed);
                        let ids: Vec<i64> = (first..first + IDS_EACH).collect();
                        let answer = post_ids(&client, &service, &ids).await?;
                        seen.slowest = seen.slowest.max(answer.took);
                        if answer.status == 202 {
                            seen.acked.extend(ids);
                        } else {
                            answer.ensure_unavailable("callback during the flood")?;
                            seen.refused += 1;
                        }
                        if n % 10 == 0 {
                            seen.peak_rss = seen.peak_rss.max(rss_bytes(pid)?);
                            let stats = admin_json(&service, "/stats").await?;
                            let pending = stats["pending_ids"].as_u64().unwrap_or(0);
                            seen.peak_pending = seen.peak_pending.max(pending);
                        }
                    }
                    Ok(seen)
                })
            })
            .collect();
        let mut flood = Flood {
            peak_rss: rss_before,
            ..Flood::default()
        };
        for poster in posters {
            flood.merge(poster.await??);
        }
        let total = POSTERS * CALLBACKS_EACH;
        let Flood {
            acked,
            refused,
            slowest,
            peak_rss,
            peak_pending,
        } = flood;
        eprintln!(
            "flood: {total} callbacks, {refused} refused with 503, {} ids accepted; slowest \
             answer {slowest:?}; RSS {} MiB before, {} MiB at most; at most {peak_pending} \
             ids pending (limit {MAX_PENDING_IDS})",
            acked.len(),
            rss_before / (1024 * 1024),
            peak_rss / (1024 * 1024)
        );
        ensure!(
            refused * 2 > total,
            "a flood far above capacity should be mostly refused: {refused} of {total}"
        );
        ensure!(
            slowest < SLOW_ANSWER,
            "an answer took {slowest:?} during the flood"
        );
        ensure!(
            peak_rss < RSS_BOUND,
            "the service grew to {} MiB",
            peak_rss / (1024 * 1024)
        );
        // Callbacks checked against the limit at the same moment may all pass it, so the
        // backlog can pass the limit by at most one callback per concurrent request.
        let overshoot = POSTERS as u64 * IDS_EACH as u64;
        ensure!(
            peak_pending <= MAX_PENDING_IDS + overshoot,
            "{peak_pending} ids pending, past the limit of {MAX_PENDING_IDS} by more than \
             one callback per concurrent request"
        );

        // The flood is over: the backlog drains and callbacks are accepted again.
        let expected: Vec<(i64, Outcome)> = acked.iter().map(|&id| (id, Outcome::Stored)).collect();
        settled(&service, &expected).await?;
        let after = next_id.fetch_add(IDS_EACH, Ordering::Relaxed);
        let ids: Vec<i64> = (after..after + IDS_EACH).collect();
        accept(&service, &ids).await?;
        let expected: Vec<(i64, Outcome)> = ids.iter().map(|&id| (id, Outcome::Stored)).collect();
        settled(&service, &expected).await?;
        Ok(())
    })
    .await
}
