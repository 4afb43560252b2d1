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

fn fetch_spans(spans: &[Value]) -> Vec<&Value> {
    spans
        .iter()
        .filter(|s| text(s, "/name") == "upstream.fetch")
        .collect()
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
        let id: i64 = req
            .path
            .strip_prefix("/objects/")
            .and_then(|raw| raw.parse().ok())
            .unwrap_or(-1);
        let _ = seen_tx.send((id, req.headers));
        (200, json!({ "id": id, "online": true }).to_string())
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
        .until(|spans| callback_span(spans).is_some() && fetch_spans(spans).len() >= 2)
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
