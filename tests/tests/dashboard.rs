//! `docker/grafana/dashboards/callback-service.json`, the dashboard the compose stack
//! provisions, against the real `callback-service`: every panel has a title and an id of
//! its own and queries the provisioned data source, and every metric name its PromQL
//! expressions (and its template variable) use is a series that `GET /metrics` exposes,
//! once the service has stored, found offline, dead-lettered, purged and failed to write.
//!
//! The names are compared as the scrape exposes them: a histogram is queried through its
//! `_bucket`, `_sum` and `_count` series, which must exist as such (and the family must be
//! a Prometheus histogram, not a summary, for `histogram_quantile` over `le` to work).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use tests::scrape::{Series, parse, scrape, types, value};
use tests::{Backend, Service, Upstream, bounded, eventually, http, read_workspace_file};

const DASHBOARD: &str = "docker/grafana/dashboards/callback-service.json";
const DATASOURCES: &str = "docker/grafana/provisioning/datasources/prometheus.yml";

const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// One PromQL expression of the dashboard and where it is.
#[derive(Debug)]
struct Query {
    /// The panel's title, or `variable <name>`.
    place: String,
    expr: String,
}

fn dashboard() -> anyhow::Result<Value> {
    serde_json::from_str(&read_workspace_file(DASHBOARD)?).with_context(|| DASHBOARD.to_owned())
}

/// Every panel, those inside rows included, in document order.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, all: &mut Vec<&'a Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            all.push(panel);
            walk(&panel["panels"], all);
        }
    }
    let mut all = Vec::new();
    walk(&dashboard["panels"], &mut all);
    all
}

/// The expressions of every panel target and of every query variable.
fn queries(dashboard: &Value) -> anyhow::Result<Vec<Query>> {
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("a target of panel {title:?} has no expr"))?;
            queries.push(Query {
                place: format!("panel {title:?}"),
                expr: expr.to_owned(),
            });
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] != "query" {
            continue;
        }
        let name = variable["name"].as_str().unwrap_or("(unnamed)");
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .with_context(|| format!("variable {name} has no query"))?;
        queries.push(Query {
            place: format!("variable {name:?}"),
            expr: variable_expr(query)
                .with_context(|| format!("variable {name}: {query:?}"))?
                .to_owned(),
        });
    }
    Ok(queries)
}

/// The PromQL inside a Prometheus variable query: `label_values(SELECTOR, label)` (the
/// selector may be absent), `query_result(EXPR)`, or `metrics(REGEX)` (no expression).
fn variable_expr(query: &str) -> anyhow::Result<&str> {
    let query = query.trim();
    if let Some(args) = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
    {
        return Ok(args.rsplit_once(',').map_or("", |(selector, _)| selector));
    }
    if let Some(expr) = query
        .strip_prefix("query_result(")
        .and_then(|q| q.strip_suffix(')'))
    {
        return Ok(expr);
    }
    anyhow::bail!("not a label_values(…) or query_result(…) query")
}

/// The `uid` of the data source that `prometheus.yml` provisions.
fn provisioned_uid() -> anyhow::Result<String> {
    let yaml = read_workspace_file(DATASOURCES)?;
    let uids: Vec<&str> = yaml
        .lines()
        .filter_map(|line| line.trim().strip_prefix("uid:"))
        .map(|uid| uid.trim().trim_matches(|c| c == '"' || c == '\''))
        .collect();
    match uids.as_slice() {
        [uid] => Ok((*uid).to_owned()),
        _ => anyhow::bail!("{DATASOURCES} should provision one data source with a uid: {uids:?}"),
    }
}

/// Metric names in PromQL, by a small tokenizer: identifiers that are not functions,
/// aggregation operators or keywords, outside strings, label matchers (`{…}`), range and
/// subquery brackets (`[…]`), grouping label lists (`by (…)`, `on (…)`, …), number and
/// duration literals, comments and Grafana variables (`$name`, `${name}`).
mod promql {
    /// PromQL's functions (Prometheus 3), `start()` and `end()` of `@` included.
    const FUNCTIONS: &[&str] = &[
        "abs",
        "absent",
        "absent_over_time",
        "acos",
        "acosh",
        "asin",
        "asinh",
        "atan",
        "atanh",
        "avg_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "cos",
        "cosh",
        "count_over_time",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "days_in_month",
        "deg",
        "delta",
        "deriv",
        "double_exponential_smoothing",
        "end",
        "exp",
        "floor",
        "histogram_avg",
        "histogram_count",
        "histogram_fraction",
        "histogram_quantile",
        "histogram_stddev",
        "histogram_stdvar",
        "histogram_sum",
        "holt_winters",
        "hour",
        "idelta",
        "increase",
        "info",
        "irate",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "mad_over_time",
        "max_over_time",
        "min_over_time",
        "minute",
        "month",
        "pi",
        "predict_linear",
        "present_over_time",
        "quantile_over_time",
        "rad",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sin",
        "sinh",
        "sort",
        "sort_by_label",
        "sort_by_label_desc",
        "sort_desc",
        "sqrt",
        "start",
        "stddev_over_time",
        "stdvar_over_time",
        "sum_over_time",
        "tan",
        "tanh",
        "time",
        "timestamp",
        "vector",
        "year",
    ];
    /// Aggregation operators (case-insensitive, like the keywords).
    const AGGREGATIONS: &[&str] = &[
        "avg",
        "bottomk",
        "count",
        "count_values",
        "group",
        "limit_ratio",
        "limitk",
        "max",
        "min",
        "quantile",
        "stddev",
        "stdvar",
        "sum",
        "topk",
    ];
    /// Keywords that take a parenthesised list of label names.
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    /// The other keywords, and the literals that look like identifiers.
    const KEYWORDS: &[&str] = &["and", "or", "unless", "offset", "bool", "inf", "nan"];

    fn is_ident_start(c: char) -> bool {
        c.is_ascii_alphabetic() || c == '_' || c == ':'
    }

    fn is_ident(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '_' || c == ':'
    }

    /// The index just past the string literal opened by `chars[start]`.
    fn skip_string(chars: &[char], start: usize) -> Result<usize, String> {
        let quote = chars[start];
        let mut i = start + 1;
        while i < chars.len() {
            match chars[i] {
                '\\' if quote != '`' => i += 2,
                c if c == quote => return Ok(i + 1),
                _ => i += 1,
            }
        }
        Err(format!("unterminated string at {start}"))
    }

    /// The index just past the `close` that matches `chars[start]`, strings skipped.
    fn skip_group(chars: &[char], start: usize, close: char) -> Result<usize, String> {
        let mut i = start + 1;
        while i < chars.len() {
            match chars[i] {
                '"' | '\'' | '`' => i = skip_string(chars, i)?,
                c if c == close => return Ok(i + 1),
                _ => i += 1,
            }
        }
        Err(format!("unclosed {:?} at {start}", chars[start]))
    }

    fn skip_spaces(chars: &[char], mut i: usize) -> usize {
        while chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        i
    }

    /// The metric names `expr` selects, in order of appearance (repeats kept); an error
    /// for an unknown function or an unterminated string or group.
    pub fn metric_names(expr: &str) -> Result<Vec<String>, String> {
        let chars: Vec<char> = expr.chars().collect();
        let mut names = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            match c {
                '"' | '\'' | '`' => i = skip_string(&chars, i)?,
                '{' => i = skip_group(&chars, i, '}')?,
                '[' => i = skip_group(&chars, i, ']')?,
                '#' => {
                    while i < chars.len() && chars[i] != '\n' {
                        i += 1;
                    }
                }
                '$' => {
                    i += 1;
                    if chars.get(i) == Some(&'{') {
                        i = skip_group(&chars, i, '}')?;
                    } else {
                        while i < chars.len() && is_ident(chars[i]) {
                            i += 1;
                        }
                    }
                }
                // Numbers and durations: 0.99, 5m, 1h30m, 0x1f, 1e3.
                _ if c.is_ascii_digit()
                    || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
                {
                    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                        i += 1;
                    }
                }
                _ if is_ident_start(c) => {
                    let start = i;
                    while i < chars.len() && is_ident(chars[i]) {
                        i += 1;
                    }
                    let word: String = chars[start..i].iter().collect();
                    let lower = word.to_ascii_lowercase();
                    let next = skip_spaces(&chars, i);
                    let called = chars.get(next) == Some(&'(');
                    let label_list = LABEL_LISTS.contains(&lower.as_str());
                    let keyword = KEYWORDS.contains(&lower.as_str())
                        || AGGREGATIONS.contains(&lower.as_str());
                    match (label_list, keyword, called) {
                        // `by (…)`, `on (…)`, …: label names.
                        (true, _, true) => i = skip_group(&chars, next, ')')?,
                        // `group_left` without labels; operators, literals, aggregations.
                        (true, _, false) | (false, true, _) => {}
                        (false, false, true) if !FUNCTIONS.contains(&word.as_str()) => {
                            return Err(format!("unknown function {word:?}"));
                        }
                        // A function: its arguments follow.
                        (false, false, true) => {}
                        (false, false, false) => names.push(word),
                    }
                }
                _ => i += 1,
            }
        }
        Ok(names)
    }
}

#[test]
fn the_tokenizer_finds_metric_names_and_nothing_else() {
    let cases: &[(&str, &[&str])] = &[
        (
            r#"sum by (status) (rate(http_requests_total{instance=~"$instance", route="/x{y}"}[$__rate_interval]))"#,
            &["http_requests_total"],
        ),
        (
            r#"histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{le!="+Inf"}[5m])))"#,
            &["a_seconds_bucket"],
        ),
        (
            "sum(rate(b_size_sum[1h30m])) / sum(rate(b_size_count[1m] offset -5m)) > bool 0.5",
            &["b_size_sum", "b_size_count"],
        ),
        (
            "foo and on (instance) bar unless ignoring(job) baz or QUX",
            &["foo", "bar", "baz", "QUX"],
        ),
        (
            "rate(c_total[5m:30s]) * on (i) group_left (team) job:info:ratio @ start()",
            &["c_total", "job:info:ratio"],
        ),
        (
            r#"label_replace(d_gauge, "dst", "$1 not_a_metric", 'src', `(.*)`)"#,
            &["d_gauge"],
        ),
        (
            "SUM WITHOUT (route) (topk(3, e_total)) # fake_metric in a comment\n + Inf * ${var}",
            &["e_total"],
        ),
        (
            "max(inbox_backlog_ids) - 1e3 + .5 + 0x1f",
            &["inbox_backlog_ids"],
        ),
    ];
    for (expr, expected) in cases {
        let expected: Vec<String> = expected.iter().map(ToString::to_string).collect();
        assert_eq!(promql::metric_names(expr), Ok(expected), "{expr}");
    }
    assert!(
        promql::metric_names("rat(x_total[5m])").is_err(),
        "a typo in a function name"
    );
    assert!(
        promql::metric_names(r#"x{a="b}"#).is_err(),
        "an unterminated string"
    );
}

#[test]
fn variable_queries_yield_their_selector() {
    assert_eq!(
        variable_expr("label_values(up{job=\"a,b\"}, instance)").unwrap(),
        "up{job=\"a,b\"}"
    );
    assert_eq!(variable_expr("label_values(instance)").unwrap(), "");
    assert_eq!(variable_expr("query_result(max(x))").unwrap(), "max(x)");
    assert!(variable_expr("metrics(.*)").is_err());
}

#[test]
fn every_panel_has_a_title_its_own_id_and_the_provisioned_data_source() -> anyhow::Result<()> {
    let dashboard = dashboard()?;
    let uid = provisioned_uid()?;
    ensure!(
        dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "the dashboard has a fixed uid, so its URL stays the same"
    );
    ensure!(
        dashboard.get("id").is_none_or(Value::is_null),
        "a provisioned dashboard has no id (Grafana assigns it)"
    );
    let all = panels(&dashboard);
    ensure!(all.len() > 10, "{} panels", all.len());
    let mut ids = BTreeSet::new();
    let mut problems = Vec::new();
    for panel in &all {
        let title = panel["title"].as_str().unwrap_or_default();
        if title.trim().is_empty() {
            problems.push(format!("a panel without a title: {}", panel["id"]));
        }
        match panel["id"].as_u64() {
            Some(id) if !ids.insert(id) => problems.push(format!("{title:?}: id {id} again")),
            Some(_) => {}
            None => problems.push(format!("{title:?}: no numeric id")),
        }
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if targets.is_empty() {
            problems.push(format!("{title:?}: no query"));
        }
        let sources =
            std::iter::once(&panel["datasource"]).chain(targets.iter().map(|t| &t["datasource"]));
        for source in sources {
            if source["uid"] != uid.as_str() || source["type"] != "prometheus" {
                problems.push(format!(
                    "{title:?}: data source {source}, not the provisioned {uid:?}"
                ));
            }
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] == "query" && variable["datasource"]["uid"] != uid.as_str() {
            problems.push(format!(
                "variable {}: data source {}",
                variable["name"], variable["datasource"]
            ));
        }
    }
    ensure!(problems.is_empty(), "{DASHBOARD}:\n{}", problems.join("\n"));
    Ok(())
}

/// The sum of every series named `name`, or `None` when there is none.
fn total(samples: &BTreeMap<Series, f64>, name: &str) -> Option<f64> {
    let values: Vec<f64> = samples
        .iter()
        .filter(|((series, _), _)| series == name)
        .map(|(_, value)| *value)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Waits until `done` holds for a scrape of `service`; `what` names the wait.
async fn scraped_until(
    service: &Service,
    what: &str,
    done: impl Fn(&BTreeMap<Series, f64>) -> bool,
) -> anyhow::Result<()> {
    eventually(WAIT, POLL, || async {
        let (_, text) = scrape(service).await?;
        Ok(done(&parse(&text)?).then_some(()))
    })
    .await
    .with_context(|| what.to_owned())
}

async fn post(service: &Service, ids: &[i64]) -> anyhow::Result<u16> {
    let response = http()
        .post(service.url("/callback"))
        .json(&json!({ "object_ids": ids }))
        .send()
        .await?;
    Ok(response.status().as_u16())
}

/// Sets the soft file size limit of process `pid` to 1 byte with util-linux's `prlimit`:
/// every write past the first byte of a file fails with EFBIG, as on a full disk.
async fn fill_the_disk(pid: u32) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg("--fsize=1:")
        .status()
        .await
        .context("cannot run prlimit (util-linux)")?;
    ensure!(status.success(), "prlimit --fsize=1: {status}");
    Ok(())
}

/// Every metric name of the dashboard's expressions, with where each is used.
fn wanted_names(dashboard: &Value) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for query in queries(dashboard)? {
        let names = promql::metric_names(&query.expr)
            .map_err(|err| anyhow::anyhow!("{}: {err} in {:?}", query.place, query.expr))?;
        ensure!(
            !names.is_empty() || query.place.starts_with("variable"),
            "{}: no metric in {:?}",
            query.place,
            query.expr
        );
        for name in names {
            wanted.entry(name).or_default().insert(query.place.clone());
        }
    }
    Ok(wanted)
}

/// Drives `service` until every series the dashboard reads has appeared: objects stored,
/// offline and expired; with `upstream` killed, fetches retried, the breaker opened and
/// dead letters recorded, then purged; last, with the disk full, a store error.
async fn drive(service: &Service, upstream: &mut Upstream) -> anyhow::Result<()> {
    // Stored (even ids are online) and offline, then expired and deleted.
    ensure!(post(service, &[0, 1, 2, 3]).await? == 202);
    scraped_until(service, "stored, offline and expired", |s| {
        value(s, "fetches_total", &[("outcome", "online")]) == Some(2.0)
            && value(s, "fetches_total", &[("outcome", "offline")]) == Some(2.0)
            && total(s, "expired_rows_deleted_total") == Some(2.0)
    })
    .await?;

    // The upstream gone: retried later, the breaker opens, then dead letters.
    upstream.process.signal("KILL")?;
    upstream.process.wait(Duration::from_secs(10)).await?;
    ensure!(post(service, &[5, 7]).await? == 202);
    scraped_until(service, "retried, breaker opened, dead-lettered", |s| {
        total(s, "fetch_failures_total") == Some(2.0)
            && total(s, "fetch_retries_scheduled_total").is_some_and(|n| n >= 2.0)
            && total(s, "upstream_breaker_transitions_total").is_some()
    })
    .await?;

    // An operator purges the dead letters, once both are recorded (they are counted when
    // their fetch fails, and recorded by the next completing transaction).
    eventually(WAIT, POLL, || async {
        let listed: Value = http()
            .get(service.admin_url("/failures"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let count = listed["failures"].as_array().map_or(0, Vec::len);
        Ok((count == 2).then_some(()))
    })
    .await
    .context("the two dead letters are not listed")?;
    let purged: Value = http()
        .delete(service.admin_url("/failures"))
        .json(&json!({ "all": true }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    ensure!(purged == json!({ "purged": 2 }), "{purged}");

    // The disk full: the inbox write of a callback fails.
    let pid = service.process.pid().context("the service is running")?;
    fill_the_disk(pid).await?;
    eventually(WAIT, POLL, || async {
        let status = post(service, &[9]).await?;
        ensure!(
            status != 202,
            "a callback accepted while nothing can be written"
        );
        let (_, text) = scrape(service).await?;
        Ok(total(&parse(&text)?, "store_errors_total").map(|_| ()))
    })
    .await
    .context("no store error while the disk was full")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_dashboard_queries_is_exposed_by_the_service() -> anyhow::Result<()> {
    // The binaries are built (once per test process) before the clock starts.
    tests::bins();
    bounded(Duration::from_secs(60), async {
        let wanted = wanted_names(&dashboard()?)?;
        let mut upstream = Upstream::start(0, 5).await?;
        let env = [
            // Once the upstream is down: one quick in-process retry, a retry scheduled in
            // the inbox, a dead letter two seconds after the request; the breaker opens at
            // the first failure.
            ("CALLBACK_UPSTREAM__RETRY_DEADLINE_MS", "100"),
            ("CALLBACK_UPSTREAM__RETRY_FIRST_DELAY_MS", "100"),
            ("CALLBACK_UPSTREAM__RETRY_HORIZON_MS", "2000"),
            ("CALLBACK_UPSTREAM__BREAKER_FAILURES", "1"),
            ("CALLBACK_UPSTREAM__BREAKER_COOL_DOWN_MS", "200"),
            ("CALLBACK_PIPELINE__POLL_INTERVAL_MS", "100"),
        ];
        let ttl = Duration::from_millis(500);
        let mut service = Service::start(Backend::Sqlite, &upstream.base_url(), ttl, &env)
            .await?
            .expect("sqlite is always available");
        drive(&service, &mut upstream).await?;

        let (_, text) = scrape(&service).await?;
        service.kill().await?;
        let exposed: BTreeSet<String> = parse(&text)?.into_keys().map(|(name, _)| name).collect();
        let types = types(&text);
        let mut problems = Vec::new();
        for (name, places) in &wanted {
            let places = places.iter().cloned().collect::<Vec<_>>().join(", ");
            if !exposed.contains(name) {
                problems.push(format!("{name} (in {places}) is not in the scrape"));
            } else if let Some(family) = name.strip_suffix("_bucket") {
                let kind = types.get(family).map_or("untyped", String::as_str);
                if kind != "histogram" {
                    problems.push(format!(
                        "{name} (in {places}): {family} is {kind}, not a histogram"
                    ));
                }
            }
        }
        ensure!(
            problems.is_empty(),
            "{DASHBOARD} queries series the service does not expose:\n{}\n\nexposed: {exposed:?}",
            problems.join("\n")
        );
        eprintln!(
            "the dashboard's {} metric names are all exposed: {:?}",
            wanted.len(),
            wanted.keys().collect::<Vec<_>>()
        );
        Ok(())
    })
    .await
}
