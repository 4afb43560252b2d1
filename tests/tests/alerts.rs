//! The alert and recording rules of `docker/prometheus/rules.yml`, two ways.
//!
//! Against the real thing: the real `callback-service` (SQLite) scraped every second by a
//! real `prometheus` of the test's own, which loads the rules with every duration turned
//! from minutes into as many seconds (`[5m]` becomes `[5s]`, `for: 5m` becomes `for: 5s`,
//! `offset 10m` becomes `offset 10s`). The rules so run sixty times faster, windows and
//! `for:` alike: `UpstreamFailing` reads the 5-minute failure ratio that the recording rule
//! `instance:fetch_failures:ratio_rate5m` keeps, which becomes a 5-second one that a 1 s
//! scrape fills at once. What an operator would see: the rule groups load and evaluate
//! without an error; while the upstream answers, the ratio is recorded at 0 for longer
//! than the alert's `for:` and nothing is pending or firing; once the upstream simulator is
//! killed while callbacks keep arriving, `UpstreamFailing` and `UpstreamBreakerOpen` fire
//! for the service's instance, with their runbook links. Without a `prometheus` binary on
//! `PATH` the test is skipped, unless `REQUIRE_PROMETHEUS` is set (CI installs Debian's
//! package and sets it).
//!
//! And as text: every alert has a severity, a summary, a description and a `runbook_url`
//! whose anchor is a heading of `docs/operations.md`, and a promtool test in
//! `docker/prometheus/rules.test.yml` that shows it firing; every duration is in whole
//! minutes (so the speed-up above is complete); every series an expression reads is one
//! the code declares, and every recorded one is recorded by the file. The test crate has
//! no YAML parser, so the files are read line by line, which their regular layout allows.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use tests::{
    Backend, Process, START_DEADLINE, Service, Upstream, bounded, eventually, http,
    read_workspace_file, workspace_file,
};
use tokio::process::Command;
use tokio::time::Instant;

const RULES: &str = "docker/prometheus/rules.yml";
const RULE_TESTS: &str = "docker/prometheus/rules.test.yml";
const RUNBOOK: &str = "docs/operations.md";
/// The job name the rules select on (`up{job="callback-service"}`).
const JOB: &str = "callback-service";

/// The bound on the whole end-to-end test.
const TEST_DEADLINE: Duration = Duration::from_secs(180);
/// How long the upstream alert may take to fire once the upstream is gone.
const FIRE_DEADLINE: Duration = Duration::from_secs(90);
/// How long Prometheus may take to load the rules, scrape, and record the healthy ratio.
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(250);
/// How often a callback of fresh ids is sent, from start to end.
const SEND_EVERY: Duration = Duration::from_millis(200);
/// Long enough that nothing expires during the test.
const TTL: Duration = Duration::from_secs(3600);

/// The service's upstream settings: a failed fetch settles (as a retry) within a fraction
/// of a second, and the open breaker probes four times a second, so the 5-second failure
/// ratio always has fetches to count while the upstream is down.
fn service_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("CALLBACK_UPSTREAM__REQUEST_TIMEOUT_MS", "1000"),
        ("CALLBACK_UPSTREAM__CONNECT_TIMEOUT_MS", "200"),
        ("CALLBACK_UPSTREAM__RETRY_DEADLINE_MS", "200"),
        ("CALLBACK_UPSTREAM__RETRY_FIRST_DELAY_MS", "100"),
        ("CALLBACK_UPSTREAM__RETRY_MAX_DELAY_MS", "500"),
        ("CALLBACK_UPSTREAM__BREAKER_FAILURES", "3"),
        ("CALLBACK_UPSTREAM__BREAKER_COOL_DOWN_MS", "250"),
        ("CALLBACK_PIPELINE__POLL_INTERVAL_MS", "100"),
    ]
}

// ----- the end-to-end test -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_alerts_fire_in_a_real_prometheus_once_the_upstream_is_down() -> anyhow::Result<()>
{
    let Some(binary) = prometheus_binary()? else {
        return Ok(());
    };
    bounded(TEST_DEADLINE, upstream_alerts_fire(binary)).await
}

async fn upstream_alerts_fire(binary: PathBuf) -> anyhow::Result<()> {
    let text = read_workspace_file(RULES)?;
    let file_rules = parse_rules(&text);
    let groups = group_names(&text);

    let started = Instant::now();
    let mut upstream = Upstream::start(0, 5).await?;
    let service = Service::start(Backend::Sqlite, &upstream.base_url(), TTL, &service_env())
        .await?
        .context("SQLite is always available")?;
    let instance = service.admin.to_string();
    let prometheus = Prometheus::start(&binary, service.admin, &minutes_to_seconds(&text)?)
        .await
        .context("start prometheus")?;
    let traffic = Traffic::start(service.url("/callback"));
    eprintln!("service and prometheus up after {:.1?}", started.elapsed());

    // The groups of the file load, with all their rules.
    let loaded = eventually(WAIT, POLL, || async {
        let data = prometheus.api("/api/v1/rules").await?;
        // The API lists groups sorted by name.
        let names: BTreeSet<&str> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|group| group["name"].as_str())
            .collect();
        let wanted: BTreeSet<&str> = groups.iter().map(String::as_str).collect();
        Ok((names == wanted).then_some(data.clone()))
    })
    .await
    .with_context(|| {
        format!(
            "Prometheus did not load the groups {groups:?} of {RULES}; it said:\n{}",
            prometheus.process.lines().join("\n")
        )
    })?;
    let loaded_rules: usize = loaded["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|group| group["rules"].as_array().map_or(0, Vec::len))
        .sum();
    ensure!(
        loaded_rules == file_rules.len(),
        "Prometheus loaded {loaded_rules} rules, {RULES} has {}",
        file_rules.len()
    );

    // Healthy: the failure ratio has been recorded at 0 more often than the alert's 5 s
    // `for:` needs, and nothing at all is pending or firing.
    let healthy = r#"max_over_time(instance:fetch_failures:ratio_rate5m[6s]) == 0
        and count_over_time(instance:fetch_failures:ratio_rate5m[6s]) >= 5"#;
    eventually(WAIT, POLL, || async {
        let result = prometheus.query(healthy).await?;
        Ok(result
            .iter()
            .any(|sample| sample["metric"]["instance"] == instance.as_str())
            .then_some(()))
    })
    .await
    .with_context(|| {
        format!(
            "the failure ratio of {instance} was not recorded at 0 while the upstream answered; \
             prometheus said:\n{}",
            prometheus.process.lines().join("\n")
        )
    })?;
    eprintln!("healthy ratio recorded after {:.1?}", started.elapsed());
    let active = prometheus.alerts().await?;
    ensure!(
        active.is_empty(),
        "alerts pending or firing while everything is healthy: {active:#?}"
    );
    ensure!(traffic.accepted() > 0, "no callback was accepted");

    // The upstream goes away; callbacks keep arriving (and are accepted).
    upstream.process.signal("KILL")?;
    upstream.process.wait(Duration::from_secs(10)).await?;
    let stopped = Instant::now();
    let accepted_before = traffic.accepted();

    let failing = wait_for_firing(&prometheus, "UpstreamFailing", &instance).await?;
    let failing_after = stopped.elapsed();
    let breaker = wait_for_firing(&prometheus, "UpstreamBreakerOpen", &instance).await?;
    let breaker_after = stopped.elapsed();
    eprintln!(
        "after the upstream stopped: UpstreamFailing firing in {failing_after:.1?}, \
         UpstreamBreakerOpen in {breaker_after:.1?}"
    );
    for (alert, anchor) in [
        (&failing, "upstreamfailing"),
        (&breaker, "upstreambreakeropen"),
    ] {
        ensure!(alert["labels"]["job"] == JOB, "{alert:#}");
        ensure!(alert["labels"]["severity"] == "warning", "{alert:#}");
        ensure!(
            alert["annotations"]["runbook_url"] == format!("{RUNBOOK}#{anchor}").as_str(),
            "{alert:#}"
        );
    }
    let summary = failing["annotations"]["summary"].as_str().unwrap_or("");
    ensure!(
        summary.ends_with(&format!("of upstream fetches of {instance} fail")),
        "summary: {summary:?}"
    );
    ensure!(
        traffic.accepted() > accepted_before,
        "no callback was accepted while the upstream was down"
    );

    // Every rule's latest evaluation succeeded (the outage's series included).
    let evaluated = prometheus.api("/api/v1/rules").await?;
    for group in evaluated["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            ensure!(
                rule["health"] == "ok",
                "rule {} of group {}: health {}, last error {}",
                rule["name"],
                group["name"],
                rule["health"],
                rule["lastError"]
            );
        }
    }

    drop(traffic);
    prometheus.stop().await
}

/// Polls `/api/v1/alerts` until `alertname` fires for `instance`; returns that alert.
async fn wait_for_firing(
    prometheus: &Prometheus,
    alertname: &str,
    instance: &str,
) -> anyhow::Result<Value> {
    let fired = eventually(FIRE_DEADLINE, POLL, || async {
        let alerts = prometheus.alerts().await?;
        Ok(alerts.into_iter().find(|alert| {
            alert["labels"]["alertname"] == alertname
                && alert["labels"]["instance"] == instance
                && alert["state"] == "firing"
        }))
    })
    .await;
    match fired {
        Ok(alert) => Ok(alert),
        Err(err) => {
            let alerts = prometheus.alerts().await.unwrap_or_default();
            let ratio = prometheus
                .query("instance:fetch_failures:ratio_rate5m")
                .await
                .unwrap_or_default();
            Err(err.context(format!(
                "{alertname} did not fire for {instance} within {FIRE_DEADLINE:?}; \
                 alerts now: {alerts:#?}; failure ratio now: {ratio:?}"
            )))
        }
    }
}

/// Callbacks of fresh ids to one url, every [`SEND_EVERY`], until dropped.
#[derive(Debug)]
struct Traffic {
    task: tokio::task::JoinHandle<()>,
    accepted: Arc<AtomicI64>,
}

impl Traffic {
    fn start(url: String) -> Self {
        let accepted = Arc::new(AtomicI64::new(0));
        let counted = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SEND_EVERY);
            for round in 0_i64.. {
                tick.tick().await;
                let ids: Vec<i64> = (round * 4..round * 4 + 4).collect();
                let answer = http()
                    .post(&url)
                    .json(&json!({ "object_ids": ids }))
                    .send()
                    .await;
                if answer.is_ok_and(|answer| answer.status() == 202) {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self { task, accepted }
    }

    /// Callbacks answered `202` so far.
    fn accepted(&self) -> i64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `prometheus` binary on `PATH`; `None` (with the skip printed) when there is none
/// and `REQUIRE_PROMETHEUS` does not ask for one.
fn prometheus_binary() -> anyhow::Result<Option<PathBuf>> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("prometheus"))
        .find(|path| path.is_file());
    match found {
        Some(path) => Ok(Some(path)),
        None if prometheus_required() => bail!(
            "REQUIRE_PROMETHEUS is set but no `prometheus` binary is on PATH \
             (Debian: apt-get install --no-install-recommends prometheus, as `bash .ci/run rules` does)"
        ),
        None => {
            eprintln!(
                "SKIPPED: the alert rules in a real Prometheus: no `prometheus` binary on PATH \
                 (REQUIRE_PROMETHEUS=1 makes this a failure)"
            );
            Ok(None)
        }
    }
}

/// Whether `REQUIRE_PROMETHEUS` asks for a failure instead of a skip.
fn prometheus_required() -> bool {
    std::env::var("REQUIRE_PROMETHEUS")
        .is_ok_and(|value| matches!(value.trim(), "1" | "true" | "yes"))
}

/// A `prometheus` of the test's own on a free loopback port, with its own data folder,
/// scraping one target every second and evaluating its rules every second; killed if
/// dropped.
#[derive(Debug)]
struct Prometheus {
    process: Process,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts it on `rules` (the text of a rules file), scraping `target`'s `/metrics`.
    async fn start(binary: &Path, target: SocketAddr, rules: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - rules.yml\n\
             scrape_configs:\n  - job_name: {JOB}\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: [\"{target}\"]\n"
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config)?;
        std::fs::write(dir.path().join("rules.yml"), rules)?;
        let mut command = Command::new(binary);
        command
            .current_dir(dir.path())
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0");
        let mut process = Process::spawn(command)?;
        let addr = process
            .wait_for_line(START_DEADLINE, listening_addr)
            .await?;
        let prometheus = Self {
            process,
            url: format!("http://{addr}"),
            _dir: dir,
        };
        // Until its storage is open, the API answers 503 in plain text.
        let ready = format!("{}/-/ready", prometheus.url);
        eventually(START_DEADLINE, POLL, || async {
            let answer = http().get(&ready).send().await;
            Ok(answer
                .is_ok_and(|answer| answer.status() == 200)
                .then_some(()))
        })
        .await
        .with_context(|| {
            format!(
                "prometheus did not turn ready; it said:\n{}",
                prometheus.process.lines().join("\n")
            )
        })?;
        Ok(prometheus)
    }

    /// `GET {path}` of the HTTP API: its `data`, once `status` is `success`.
    async fn api(&self, path: &str) -> anyhow::Result<Value> {
        self.get(reqwest::Url::parse(&format!("{}{path}", self.url))?)
            .await
    }

    async fn get(&self, url: reqwest::Url) -> anyhow::Result<Value> {
        let body: Value = http().get(url.clone()).send().await?.json().await?;
        ensure!(body["status"] == "success", "GET {url}: {body}");
        Ok(body["data"].clone())
    }

    /// The instant vector `expr` evaluates to now.
    async fn query(&self, expr: &str) -> anyhow::Result<Vec<Value>> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.url),
            [("query", expr)],
        )?;
        let data = self.get(url).await?;
        ensure!(data["resultType"] == "vector", "{expr}: {data}");
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The alerts pending or firing now.
    async fn alerts(&self) -> anyhow::Result<Vec<Value>> {
        let data = self.api("/api/v1/alerts").await?;
        Ok(data["alerts"].as_array().cloned().unwrap_or_default())
    }

    /// Kills the process and waits until it is gone.
    async fn stop(mut self) -> anyhow::Result<()> {
        self.process.signal("KILL")?;
        self.process.wait(Duration::from_secs(10)).await?;
        Ok(())
    }
}

/// The address in Prometheus's `msg="Listening on" address=127.0.0.1:PORT` log line (the
/// port it was given, `0`, is in an earlier line).
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("Listening on") {
        return None;
    }
    line.split_whitespace()
        .filter_map(|word| word.strip_prefix("address="))
        .filter_map(|addr| addr.trim_matches('"').parse::<SocketAddr>().ok())
        .find(|addr| addr.port() != 0)
}

// ----- the rules file as text -----

/// One rule of the rules file, as the line reader sees it.
#[derive(Debug, Default)]
struct Rule {
    /// Whether it is an alert (else a recording rule).
    alert: bool,
    /// The alert's name, or the recorded series.
    name: String,
    expr: String,
    severity: Option<String>,
    summary: Option<String>,
    description: Option<String>,
    runbook_url: Option<String>,
}

/// Every rule of `text`, in order.
fn parse_rules(text: &str) -> Vec<Rule> {
    let lines: Vec<&str> = text.lines().collect();
    let mut rules: Vec<Rule> = Vec::new();
    let mut at = 0;
    while at < lines.len() {
        let Some((key, value, next)) = entry(&lines, at) else {
            at += 1;
            continue;
        };
        at = next;
        if key == "alert" || key == "record" {
            rules.push(Rule {
                alert: key == "alert",
                name: value,
                ..Rule::default()
            });
            continue;
        }
        let Some(rule) = rules.last_mut() else {
            continue;
        };
        let slot = match key {
            "expr" => {
                rule.expr = value;
                continue;
            }
            "severity" => &mut rule.severity,
            "summary" => &mut rule.summary,
            "description" => &mut rule.description,
            "runbook_url" => &mut rule.runbook_url,
            _ => continue,
        };
        *slot = Some(value);
    }
    rules
}

/// The `key: value` at line `at` (a list item's `- ` dropped, quotes trimmed; a block
/// scalar, `|` or `>-`, read from the more indented lines after it) and the line after it.
fn entry<'a>(lines: &[&'a str], at: usize) -> Option<(&'a str, String, usize)> {
    let line = lines[at];
    let trimmed = line.trim_start();
    if trimmed.starts_with('#') {
        return None;
    }
    let item = trimmed.strip_prefix("- ").unwrap_or(trimmed);
    let (key, value) = item.split_once(':')?;
    let value = value.trim();
    if !matches!(value, "|" | "|-" | ">" | ">-") {
        return Some((key.trim(), value.trim_matches('"').to_owned(), at + 1));
    }
    let indent = indentation(line);
    let mut next = at + 1;
    let mut block = Vec::new();
    while next < lines.len() && (lines[next].trim().is_empty() || indentation(lines[next]) > indent)
    {
        block.push(lines[next].trim());
        next += 1;
    }
    let joined = block.join(if value.starts_with('|') { "\n" } else { " " });
    Some((key.trim(), joined.trim().to_owned(), next))
}

fn indentation(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The names of the rule groups, in order.
fn group_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.trim_start().strip_prefix("- name:"))
        .map(|name| name.trim().trim_matches('"').to_owned())
        .collect()
}

/// `rules` with every duration, `[Nm]`, `offset Nm` and `for: Nm`, turned into `Ns`;
/// an error names a duration that is not in whole minutes. Comments are left as they are.
fn minutes_to_seconds(rules: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(rules.len());
    for (number, line) in rules.lines().enumerate() {
        let scaled = scale_line(line).with_context(|| format!("{RULES}:{}", number + 1))?;
        out.push_str(&scaled);
        out.push('\n');
    }
    Ok(out)
}

fn scale_line(line: &str) -> anyhow::Result<String> {
    let trimmed = line.trim_start();
    if trimmed.starts_with('#') {
        return Ok(line.to_owned());
    }
    if let Some(value) = trimmed.strip_prefix("for:") {
        let indent = &line[..indentation(line)];
        return Ok(format!("{indent}for: {}s", whole_minutes(value.trim())?));
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = [rest.find('['), rest.find("offset ")]
        .into_iter()
        .flatten()
        .min()
    {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        if let Some(inside) = from.strip_prefix('[') {
            let end = inside.find(']').context("a `[` without its `]`")?;
            out.push_str(&format!("[{}s]", whole_minutes(&inside[..end])?));
            rest = &inside[end + 1..];
        } else {
            let after = &from["offset ".len()..];
            let end = after
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(after.len());
            out.push_str(&format!("offset {}s", whole_minutes(&after[..end])?));
            rest = &after[end..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn whole_minutes(duration: &str) -> anyhow::Result<u64> {
    duration
        .strip_suffix('m')
        .and_then(|minutes| minutes.parse().ok())
        .with_context(|| {
            format!(
                "{duration:?} is not a duration in whole minutes, which tests/tests/alerts.rs \
                 turns into seconds"
            )
        })
}

/// The GitHub anchor of every heading of a Markdown text.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| {
            line.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// Alert names with a promtool test case that expects them firing (a non-empty
/// `exp_alerts`), and every alert name tested at all.
fn tested_alerts(tests: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut firing = BTreeSet::new();
    let mut all = BTreeSet::new();
    let mut current: Option<String> = None;
    for line in tests.lines().map(str::trim_start) {
        let line = line.strip_prefix("- ").unwrap_or(line);
        if let Some(name) = line.strip_prefix("alertname:") {
            let name = name.trim().to_owned();
            all.insert(name.clone());
            current = Some(name);
        } else if let Some(expected) = line.strip_prefix("exp_alerts:")
            && let Some(name) = current.take()
            && expected.trim() != "[]"
        {
            firing.insert(name);
        }
    }
    (firing, all)
}

/// Every `const NAME: &str = "value";` value in `source`.
fn declared_names(source: &str) -> impl Iterator<Item = String> + '_ {
    source.lines().filter_map(|line| {
        let line = line.trim_start();
        let line = line.strip_prefix("pub ").unwrap_or(line);
        let rest = line.strip_prefix("const ")?;
        let (_, value) = rest.split_once(": &str = \"")?;
        Some(value.split('"').next()?.to_owned())
    })
}

/// The series an expression reads: its identifiers less functions, aggregations and
/// their `by (...)` labels, operators, label matchers, windows, strings and numbers.
fn series_read(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        // aggregation operators, which may be followed by `by (...)` before their `(`
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        // binary operators and modifiers
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "by",
        "without",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut at = 0;
    let skip_to = |from: usize, close: char| {
        chars[from..]
            .iter()
            .position(|&c| c == close)
            .map_or(chars.len(), |offset| from + offset + 1)
    };
    while at < chars.len() {
        let c = chars[at];
        if c == '{' {
            at = skip_to(at + 1, '}');
        } else if c == '[' {
            at = skip_to(at + 1, ']');
        } else if c == '"' {
            at = skip_to(at + 1, '"');
        } else if c.is_ascii_digit() {
            while at < chars.len() && (chars[at].is_ascii_alphanumeric() || chars[at] == '.') {
                at += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = at;
            while at < chars.len()
                && (chars[at].is_ascii_alphanumeric() || chars[at] == '_' || chars[at] == ':')
            {
                at += 1;
            }
            let word: String = chars[start..at].iter().collect();
            let mut next = at;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let called = chars.get(next) == Some(&'(');
            if called && ["by", "without", "on", "ignoring"].contains(&word.as_str()) {
                at = skip_to(next + 1, ')');
            } else if !called && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            at += 1;
        }
    }
    names
}

#[test]
fn every_alert_is_documented_linked_to_its_runbook_and_tested() -> anyhow::Result<()> {
    let rules = parse_rules(&read_workspace_file(RULES)?);
    let runbook = anchors(&read_workspace_file(RUNBOOK)?);
    let (firing, tested) = tested_alerts(&read_workspace_file(RULE_TESTS)?);
    let alerts: Vec<&Rule> = rules.iter().filter(|rule| rule.alert).collect();
    ensure!(
        alerts.len() >= 10,
        "only {} alerts in {RULES}",
        alerts.len()
    );
    let mut problems = Vec::new();
    for alert in &alerts {
        let name = &alert.name;
        if !matches!(alert.severity.as_deref(), Some("critical" | "warning")) {
            problems.push(format!("{name}: severity {:?}", alert.severity));
        }
        for (what, text) in [
            ("summary", &alert.summary),
            ("description", &alert.description),
        ] {
            if text.as_deref().is_none_or(|text| text.trim().is_empty()) {
                problems.push(format!("{name}: no {what}"));
            }
        }
        if alert.expr.is_empty() {
            problems.push(format!("{name}: no expr"));
        }
        match alert
            .runbook_url
            .as_deref()
            .and_then(|url| url.strip_prefix(&format!("{RUNBOOK}#")))
        {
            None => problems.push(format!(
                "{name}: runbook_url {:?} is not {RUNBOOK}#<anchor>",
                alert.runbook_url
            )),
            Some(anchor) if !runbook.contains(anchor) => {
                problems.push(format!("{name}: {RUNBOOK} has no heading #{anchor}"))
            }
            Some(_) => {}
        }
        if !firing.contains(name) {
            problems.push(format!("{name}: no test in {RULE_TESTS} expects it firing"));
        }
    }
    let names: BTreeSet<&str> = alerts.iter().map(|alert| alert.name.as_str()).collect();
    ensure!(
        names.len() == alerts.len(),
        "an alert name is used twice in {RULES}"
    );
    for unknown in tested.iter().filter(|name| !names.contains(name.as_str())) {
        problems.push(format!(
            "{RULE_TESTS} tests {unknown}, which {RULES} has not"
        ));
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

#[test]
fn every_duration_is_in_whole_minutes_so_the_end_to_end_test_can_speed_it_up() -> anyhow::Result<()>
{
    let text = read_workspace_file(RULES)?;
    let fast = minutes_to_seconds(&text)?;
    let expressions = |text: &str| -> Vec<String> {
        parse_rules(text)
            .into_iter()
            .map(|rule| rule.expr)
            .collect()
    };
    let (slow, quick) = (expressions(&text), expressions(&fast));
    ensure!(slow.len() == quick.len());
    for (slow, quick) in slow.iter().zip(&quick) {
        ensure!(
            slow.matches('[').count() == quick.matches("s]").count() && !quick.contains("m]"),
            "{slow}\nbecame\n{quick}"
        );
        let offsets_in_seconds = quick.split("offset ").skip(1).all(|after| {
            after
                .split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .is_some_and(|duration| duration.ends_with('s'))
        });
        ensure!(offsets_in_seconds, "{slow}\nbecame\n{quick}");
    }
    let fors = |text: &str| {
        text.lines()
            .filter(|line| line.trim_start().starts_with("for:"))
            .map(|line| line.trim().to_owned())
            .collect::<Vec<_>>()
    };
    ensure!(
        fors(&fast).iter().all(|line| line.ends_with('s'))
            && fors(&fast).len() == fors(&text).len(),
        "{:?}",
        fors(&fast)
    );
    // The speed-up in small.
    ensure!(
        scale_line("        expr: increase(x[10m]) > 0 unless x offset 10m")?
            == "        expr: increase(x[10s]) > 0 unless x offset 10s"
    );
    ensure!(scale_line("        for: 15m")? == "        for: 15s");
    ensure!(scale_line("        for: 1h").is_err());
    ensure!(scale_line("        expr: rate(x[30s])").is_err());
    Ok(())
}

#[test]
fn every_series_the_rules_read_is_declared_by_the_code_or_recorded_by_the_file()
-> anyhow::Result<()> {
    let rules = parse_rules(&read_workspace_file(RULES)?);
    let recorded: BTreeSet<&str> = rules
        .iter()
        .filter(|rule| !rule.alert)
        .map(|rule| rule.name.as_str())
        .collect();
    // Every series the service exports is named by a constant next to its `describe`.
    let mut declared: BTreeSet<String> = BTreeSet::from(["up".to_owned()]);
    let mut sources = vec!["crates/upstream-client/src/lib.rs".to_owned()];
    for krate in std::fs::read_dir(workspace_file("crates"))? {
        let name = krate?.file_name().to_string_lossy().into_owned();
        if workspace_file(&format!("crates/{name}/src/metrics.rs")).is_file() {
            sources.push(format!("crates/{name}/src/metrics.rs"));
        }
    }
    for source in &sources {
        declared.extend(declared_names(&read_workspace_file(source)?));
    }
    ensure!(
        declared.contains("fetches_total"),
        "no metric names found in {sources:?}"
    );
    let mut problems = Vec::new();
    for rule in &rules {
        for series in series_read(&rule.expr) {
            let known = if series.contains(':') {
                recorded.contains(series.as_str())
            } else {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| series.strip_suffix(suffix))
                    .filter(|family| declared.contains(*family));
                declared.contains(&series) || family.is_some()
            };
            if !known {
                problems.push(format!(
                    "{}: reads {series}, which nothing declares",
                    rule.name
                ));
            }
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

#[test]
fn the_line_readers_read_what_they_should() -> anyhow::Result<()> {
    let rules = parse_rules(
        "groups:\n  - name: g\n    rules:\n      - record: a:b:rate5m\n        expr: sum(rate(x_total[5m]))\n\
         \n      - alert: A\n        expr: |\n          a:b:rate5m > 1\n          and up == 1\n\
         \x20       for: 5m\n        labels:\n          severity: warning\n        annotations:\n\
         \x20         summary: \"s {{ $labels.instance }}\"\n          description: >-\n\
         \x20           one\n            two\n          runbook_url: \"docs/operations.md#a\"\n",
    );
    ensure!(rules.len() == 2, "{rules:#?}");
    ensure!(!rules[0].alert && rules[0].name == "a:b:rate5m");
    let alert = &rules[1];
    ensure!(alert.alert && alert.name == "A", "{alert:#?}");
    ensure!(alert.expr == "a:b:rate5m > 1\nand up == 1", "{alert:#?}");
    ensure!(alert.severity.as_deref() == Some("warning"));
    ensure!(alert.summary.as_deref() == Some("s {{ $labels.instance }}"));
    ensure!(alert.description.as_deref() == Some("one two"));
    ensure!(alert.runbook_url.as_deref() == Some("docs/operations.md#a"));

    let read = series_read(
        r#"sum by (job, instance) (rate(http_requests_total{route="/callback",status=~"5.."}[5m]))
           or 0 * histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))
           unless y offset 10m and on (instance) a:b:rate5m > 1e3"#,
    );
    let expected: BTreeSet<String> = ["http_requests_total", "x_bucket", "y", "a:b:rate5m"]
        .map(str::to_owned)
        .into();
    ensure!(read == expected, "{read:?}");

    let (firing, all) = tested_alerts(
        "  - eval_time: 1m\n    alertname: A\n    exp_alerts: []\n  - eval_time: 5m\n    \
         alertname: A\n    exp_alerts:\n      - exp_labels: {}\n  - alertname: B\n    exp_alerts: []\n",
    );
    ensure!(firing == BTreeSet::from(["A".to_owned()]), "{firing:?}");
    ensure!(all.len() == 2, "{all:?}");

    ensure!(
        anchors("# Title\n## UpstreamFailing\n### What `202` means\n").contains("upstreamfailing")
    );
    ensure!(anchors("### What `202` means").contains("what-202-means"));
    ensure!(
        listening_addr(
            r#"ts=2026-12-07T09:15:34.008Z caller=tls_config.go:232 level=info component=web msg="Listening on" address=127.0.0.1:46553"#
        ) == Some("127.0.0.1:46553".parse()?)
    );
    ensure!(
        listening_addr(r#"msg="Start listening for connections" address=127.0.0.1:0"#).is_none()
    );
    Ok(())
}
