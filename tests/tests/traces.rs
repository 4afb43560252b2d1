//! Traces exported to Zipkin by the real binaries: a fake collector on 127.0.0.1 receives
//! the spans of one callback, and the upstream request carries the fetch span's context
//! (W3C `traceparent`, B3), which the real `client-service` continues.
//!
//! SQLite only: span export does not depend on the backend.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tests::{Backend, Service, Upstream, http};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// One request as the fake servers see it.
#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    /// Header names in lowercase.
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

type Answer = dyn Fn(Request) -> (u16, String) + Send + Sync;

/// Serves HTTP/1.1 (keep-alive, `content-length` bodies) on a free loopback port; `answer`
/// sees every request and gives the status and JSON body to send back.
async fn serve(
    answer: impl Fn(Request) -> (u16, String) + Send + Sync + 'static,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let answer: Arc<Answer> = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                if let Err(err) = connection(stream, &*answer).await {
                    eprintln!("fake server: {err:#}");
                }
            });
        }
    });
    Ok(addr)
}

async fn connection(stream: TcpStream, answer: &Answer) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().context("no method")?.to_owned();
        let path = parts.next().context("no path")?.to_owned();
        let mut headers = HashMap::new();
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).await?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        if headers.contains_key("transfer-encoding") {
            bail!("this fake reads content-length bodies only");
        }
        let len: usize = headers
            .get("content-length")
            .map(|v| v.parse())
            .transpose()?
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).await?;
        let (status, text) = answer(Request {
            method,
            path,
            headers,
            body,
        });
        let response = format!(
            "HTTP/1.1 {status} Fake\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        write.write_all(response.as_bytes()).await?;
    }
}

/// The id of a `GET /objects/{id}` path; -1 when the path names none.
fn requested_id(path: &str) -> i64 {
    path.strip_prefix("/objects/")
        .and_then(|raw| raw.parse().ok())
        .unwrap_or(-1)
}

/// The upstream's answer reporting the requested object online.
fn online_answer(path: &str) -> (u16, String) {
    let id = requested_id(path);
    (200, json!({ "id": id, "online": true }).to_string())
}

/// A fake Zipkin collector: every `POST /api/v2/spans` body is parsed and kept.
struct Collector {
    endpoint: String,
    batches: mpsc::UnboundedReceiver<Vec<Value>>,
    spans: Vec<Value>,
}

impl Collector {
    async fn start() -> anyhow::Result<Self> {
        let (tx, batches) = mpsc::unbounded_channel();
        let addr = serve(move |req| {
            if req.method != "POST" || req.path != "/api/v2/spans" {
                return (404, String::new());
            }
            match serde_json::from_slice::<Vec<Value>>(&req.body) {
                Ok(spans) => {
                    let _ = tx.send(spans);
                    (202, String::new())
                }
                Err(err) => {
                    eprintln!("collector: not a json span list: {err}");
                    (400, String::new())
                }
            }
        })
        .await?;
        Ok(Self {
            endpoint: format!("http://{addr}/api/v2/spans"),
            batches,
            spans: Vec::new(),
        })
    }

    /// Waits until the spans received so far satisfy `done`.
    async fn until(&mut self, done: impl Fn(&[Value]) -> bool) -> anyhow::Result<&[Value]> {
        let give_up = tokio::time::Instant::now() + WAIT;
        while !done(&self.spans) {
            match tokio::time::timeout_at(give_up, self.batches.recv()).await {
                Ok(Some(batch)) => self.spans.extend(batch),
                Ok(None) => bail!("the collector stopped"),
                Err(_) => bail!(
                    "the expected spans did not arrive within {WAIT:?}; got {:#}",
                    Value::Array(self.spans.clone())
                ),
            }
        }
        Ok(&self.spans)
    }
}

fn text<'v>(span: &'v Value, pointer: &str) -> &'v str {
    span.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn named<'s>(spans: &'s [Value], name: &str) -> Vec<&'s Value> {
    spans
        .iter()
        .filter(|s| text(s, "/name").eq_ignore_ascii_case(name))
        .collect()
}

fn fetch_spans(spans: &[Value]) -> Vec<&Value> {
    named(spans, "upstream.fetch")
}

/// The pipeline's span around the fetch of `id`.
fn pipeline_fetch_span<'s>(spans: &'s [Value], id: &str) -> Option<&'s Value> {
    named(spans, "fetch")
        .into_iter()
        .find(|s| text(s, "/tags/object_id") == id)
}

fn callback_span(spans: &[Value]) -> Option<&Value> {
    spans
        .iter()
        .find(|s| text(s, "/name").eq_ignore_ascii_case("POST /callback"))
}

/// `traceparent` split into trace id, parent span id and flags, if well-formed.
fn parse_traceparent(value: &str) -> Option<(&str, &str, &str)> {
    let mut parts = value.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let well_formed = version == "00"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && parts.next().is_none()
        && trace != "0".repeat(32)
        && parent != "0".repeat(16);
    well_formed.then_some((trace, parent, flags))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callback_exports_its_request_and_fetch_spans_and_the_upstream_gets_traceparent()
-> anyhow::Result<()> {
    let mut collector = Collector::start().await?;
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(i64, HashMap<String, String>)>();
    let upstream = serve(move |req| {
        let (status, body) = online_answer(&req.path);
        let _ = seen_tx.send((requested_id(&req.path), req.headers));
        (status, body)
    })
    .await?;
    let mut service = Service::start(
        Backend::Sqlite,
        &format!("http://{upstream}"),
        Duration::from_secs(600),
        &[("CALLBACK_TELEMETRY__ZIPKIN_ENDPOINT", &collector.endpoint)],
    )
    .await?
    .context("sqlite is always available")?;

    let response = http()
        .post(service.url("/callback"))
        .json(&json!({ "object_ids": [3, 4] }))
        .send()
        .await?;
    assert_eq!(response.status(), 202);

    let mut traceparents = HashMap::new();
    let mut b3_trace_ids = HashMap::new();
    while traceparents.len() < 2 {
        let (id, headers) = tokio::time::timeout(WAIT, seen.recv())
            .await
            .context("the upstream was not asked about both ids")?
            .context("the fake upstream stopped")?;
        let traceparent = headers
            .get("traceparent")
            .with_context(|| format!("the request for {id} has no traceparent: {headers:?}"))?;
        traceparents.insert(id, traceparent.clone());
        b3_trace_ids.insert(id, headers.get("x-b3-traceid").cloned());
    }

    // A graceful stop finishes the fetches and flushes the spans still buffered.
    service.process.signal("TERM")?;
    assert!(service.process.wait(WAIT).await?.success());

    let spans = collector
        .until(|spans| {
            callback_span(spans).is_some()
                && fetch_spans(spans).len() >= 2
                && named(spans, "fetch").len() >= 2
                && !named(spans, "store.batch").is_empty()
        })
        .await?;
    for span in spans {
        assert_eq!(
            text(span, "/localEndpoint/serviceName"),
            "callback-service",
            "{span:#}"
        );
    }
    let callback = callback_span(spans).expect("waited for");
    assert_eq!(text(callback, "/kind"), "SERVER", "{callback:#}");
    assert_eq!(text(callback, "/tags/route"), "/callback", "{callback:#}");
    assert_eq!(text(callback, "/tags/status"), "202", "{callback:#}");
    let callback_trace = text(callback, "/traceId");

    // One trace: the request, then per id the pipeline's fetch span (carried through the
    // inbox) with the upstream request under it, and the store batch.
    let batch = named(spans, "store.batch")[0];
    assert_eq!(text(batch, "/traceId"), callback_trace, "{batch:#}");
    for id in ["3", "4"] {
        let fetch = pipeline_fetch_span(spans, id)
            .with_context(|| format!("no pipeline fetch span for {id}"))?;
        assert_eq!(text(fetch, "/traceId"), callback_trace, "{fetch:#}");
        assert_eq!(text(fetch, "/tags/outcome"), "online", "{fetch:#}");
        let upstream = fetch_spans(spans)
            .into_iter()
            .find(|s| text(s, "/tags/object_id") == id)
            .with_context(|| format!("no upstream.fetch span for {id}"))?;
        assert_eq!(
            text(upstream, "/parentId"),
            text(fetch, "/id"),
            "{upstream:#}"
        );
    }

    for (id, traceparent) in &traceparents {
        let (trace, parent, flags) = parse_traceparent(traceparent)
            .with_context(|| format!("malformed traceparent {traceparent:?}"))?;
        assert_eq!(flags, "01", "sampled at ratio 1.0: {traceparent}");
        let fetch = fetch_spans(spans)
            .into_iter()
            .find(|s| text(s, "/tags/object_id") == id.to_string())
            .with_context(|| format!("no upstream.fetch span for {id}"))?;
        assert_eq!(text(fetch, "/kind"), "CLIENT", "{fetch:#}");
        assert_eq!(text(fetch, "/traceId"), trace, "{fetch:#}");
        assert_eq!(text(fetch, "/id"), parent, "{fetch:#}");
        assert_eq!(
            b3_trace_ids[id].as_deref(),
            Some(trace),
            "B3 names the same trace"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_service_simulator_continues_the_fetch_trace() -> anyhow::Result<()> {
    let mut collector = Collector::start().await?;
    let upstream = Upstream::start_with_env(
        1,
        1,
        &[("CLIENT_TELEMETRY__ZIPKIN_ENDPOINT", &collector.endpoint)],
    )
    .await?;
    let service = Service::start(
        Backend::Sqlite,
        &upstream.base_url(),
        Duration::from_secs(600),
        &[("CALLBACK_TELEMETRY__ZIPKIN_ENDPOINT", &collector.endpoint)],
    )
    .await?
    .context("sqlite is always available")?;

    let response = http()
        .post(service.url("/callback"))
        .json(&json!({ "object_ids": [8] }))
        .send()
        .await?;
    assert_eq!(response.status(), 202);

    let simulator = |spans: &[Value]| -> Option<Value> {
        spans
            .iter()
            .find(|s| text(s, "/localEndpoint/serviceName") == "client-service")
            .cloned()
    };
    let spans = collector
        .until(|spans| simulator(spans).is_some() && !fetch_spans(spans).is_empty())
        .await?;
    let served = simulator(spans).expect("waited for");
    let fetch = fetch_spans(spans)[0];
    assert_eq!(
        text(fetch, "/localEndpoint/serviceName"),
        "callback-service"
    );
    assert_eq!(text(&served, "/kind"), "SERVER", "{served:#}");
    assert_eq!(text(&served, "/tags/path"), "/objects/8", "{served:#}");
    assert_eq!(
        text(&served, "/traceId"),
        text(fetch, "/traceId"),
        "one trace"
    );
    assert_eq!(
        text(&served, "/parentId"),
        text(fetch, "/id"),
        "the simulator's span is a child of the fetch"
    );
    Ok(())
}

#[test]
fn traceparent_parsing_rejects_malformed_values() {
    assert!(parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
    for bad in [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
    ] {
        assert!(parse_traceparent(bad).is_none(), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_left_by_a_killed_instance_joins_the_callbacks_trace_after_the_restart()
-> anyhow::Result<()> {
    let mut collector = Collector::start().await?;
    // Down (503) until told otherwise: the first instance keeps retrying the fetch.
    let answering = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let up = Arc::clone(&answering);
    let upstream = serve(move |req| {
        if !up.load(std::sync::atomic::Ordering::SeqCst) {
            return (503, String::new());
        }
        online_answer(&req.path)
    })
    .await?;
    let mut first = Service::start(
        Backend::Sqlite,
        &format!("http://{upstream}"),
        Duration::from_secs(600),
        &[
            ("CALLBACK_TELEMETRY__ZIPKIN_ENDPOINT", &collector.endpoint),
            ("CALLBACK_UPSTREAM__RETRY_DEADLINE_MS", "120000"),
            ("CALLBACK_PIPELINE__LEASE_MS", "180000"),
        ],
    )
    .await?
    .context("sqlite is always available")?;
    let response = http()
        .post(first.url("/callback"))
        .json(&json!({ "object_ids": [6] }))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    // The request's spans leave with the next export; then the instance dies mid-fetch.
    let callback_trace = text(
        callback_span(
            collector
                .until(|spans| callback_span(spans).is_some())
                .await?,
        )
        .expect("waited for"),
        "/traceId",
    )
    .to_owned();
    first.kill().await?;
    let before_restart: Vec<String> = collector
        .spans
        .iter()
        .filter(|s| text(s, "/traceId") == callback_trace)
        .map(|s| text(s, "/id").to_owned())
        .collect();

    answering.store(true, std::sync::atomic::Ordering::SeqCst);
    let restarted = first.another().await?;
    let spans = collector
        .until(|spans| {
            pipeline_fetch_span(spans, "6").is_some_and(|s| text(s, "/tags/outcome") == "online")
        })
        .await?;
    let fetch = named(spans, "fetch")
        .into_iter()
        .find(|s| text(s, "/tags/object_id") == "6" && text(s, "/tags/outcome") == "online")
        .expect("waited for");
    assert_eq!(
        text(fetch, "/traceId"),
        callback_trace,
        "the restarted instance's fetch joins the callback's trace: {fetch:#}"
    );
    assert!(
        before_restart
            .iter()
            .any(|id| id == text(fetch, "/parentId")),
        "its parent is a span of the request, exported before the kill: {fetch:#} not under {before_restart:?}"
    );
    drop(restarted);
    Ok(())
}

/// With callers authenticated, a caller's `traceparent` does not continue its trace (it
/// could otherwise force every request to be sampled): the request starts a trace of its
/// own, unless `telemetry.trust_incoming_trace` says the callers are trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_a_callers_trace_is_continued_only_when_trusted() -> anyhow::Result<()> {
    const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let upstream = serve(|req| online_answer(&req.path)).await?;
    for (trust, continued) in [(None, false), (Some("true"), true)] {
        let mut collector = Collector::start().await?;
        let mut env = vec![
            (
                "CALLBACK_TELEMETRY__ZIPKIN_ENDPOINT",
                collector.endpoint.as_str(),
            ),
            ("CALLBACK_AUTH__MODE", "bearer"),
            ("CALLBACK_AUTH__API_KEYS", "trace-test-key"),
        ];
        if let Some(trust) = trust {
            env.push(("CALLBACK_TELEMETRY__TRUST_INCOMING_TRACE", trust));
        }
        let service = Service::start(
            Backend::Sqlite,
            &format!("http://{upstream}"),
            Duration::from_secs(600),
            &env,
        )
        .await?
        .context("sqlite is always available")?;
        let response = http()
            .post(service.url("/callback"))
            .bearer_auth("trace-test-key")
            .header(
                "traceparent",
                format!("00-{CALLER_TRACE}-00f067aa0ba902b7-01"),
            )
            .json(&json!({ "object_ids": [8] }))
            .send()
            .await?;
        assert_eq!(response.status(), 202);
        let spans = collector
            .until(|spans| callback_span(spans).is_some())
            .await?;
        let span = callback_span(spans).expect("waited for");
        assert_eq!(
            text(span, "/traceId") == CALLER_TRACE,
            continued,
            "trust_incoming_trace = {trust:?}: {span:#}"
        );
    }
    Ok(())
}
