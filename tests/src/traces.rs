//! Span export as the collectors see it, shared by `tests/tests/traces.rs`: a fake HTTP
//! server on 127.0.0.1, a fake collector that turns what it receives into [`Span`]s (one
//! shape whatever the wire format, Zipkin JSON or OTLP protobuf), and the expectations on
//! the trace of one callback, so that every exporter is held to the same ones.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::{Backend, Service};

/// How long the tests wait for a collector or the upstream.
pub const WAIT: Duration = Duration::from_secs(20);

/// One request as the fake servers see it.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path and query.
    pub path: String,
    /// Header names in lowercase.
    pub headers: HashMap<String, String>,
    /// The body, read by its `content-length`.
    pub body: Vec<u8>,
}

type Answer = dyn Fn(Request) -> (u16, String) + Send + Sync;

/// Serves HTTP/1.1 (keep-alive, `content-length` bodies) on a free loopback port; `answer`
/// sees every request and gives the status and JSON body to send back. The server lives as
/// long as the test's runtime.
pub async fn serve(
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
pub fn requested_id(path: &str) -> i64 {
    path.strip_prefix("/objects/")
        .and_then(|raw| raw.parse().ok())
        .unwrap_or(-1)
}

/// The upstream's answer reporting the requested object online.
pub fn online_answer(path: &str) -> (u16, String) {
    let id = requested_id(path);
    (200, json!({ "id": id, "online": true }).to_string())
}

/// A span as a collector received it, whatever the wire format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// The service that sent it (Zipkin's `localEndpoint.serviceName`, OTLP's resource
    /// attribute `service.name`).
    pub service: String,
    /// Its name, e.g. `upstream.fetch`.
    pub name: String,
    /// `SERVER`, `CLIENT`, `INTERNAL`, … (Zipkin's kind; a Zipkin span without one is
    /// `INTERNAL`).
    pub kind: String,
    /// The trace id, 32 lowercase hex digits.
    pub trace_id: String,
    /// The span id, 16 lowercase hex digits.
    pub id: String,
    /// The parent's span id; empty for a root span.
    pub parent_id: String,
    /// The attributes (Zipkin's tags), every value as text.
    pub tags: BTreeMap<String, String>,
}

impl Span {
    /// The attribute `key` as text; empty when absent.
    pub fn tag(&self, key: &str) -> &str {
        self.tags.get(key).map_or("", String::as_str)
    }
}

/// The spans of a Zipkin v2 JSON span list.
pub fn zipkin_spans(body: &[u8]) -> anyhow::Result<Vec<Span>> {
    let spans: Vec<Value> = serde_json::from_slice(body).context("not a json span list")?;
    let text = |span: &Value, pointer: &str| {
        span.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    spans
        .iter()
        .map(|span| {
            let tags = match span.get("tags") {
                Some(Value::Object(tags)) => tags
                    .iter()
                    .map(|(key, value)| {
                        let value = value
                            .as_str()
                            .map_or_else(|| value.to_string(), str::to_owned);
                        (key.clone(), value)
                    })
                    .collect(),
                _ => BTreeMap::new(),
            };
            let kind = text(span, "/kind");
            Ok(Span {
                service: text(span, "/localEndpoint/serviceName"),
                name: text(span, "/name"),
                kind: if kind.is_empty() {
                    "INTERNAL".to_owned()
                } else {
                    kind
                },
                trace_id: text(span, "/traceId"),
                id: text(span, "/id"),
                parent_id: text(span, "/parentId"),
                tags,
            })
        })
        .collect()
}

/// Turns the body a collector received into spans.
pub type Decode = fn(&[u8]) -> anyhow::Result<Vec<Span>>;

/// A fake collector on 127.0.0.1: every `POST` to its path is decoded and kept, and
/// answered `status` with an empty body; anything else is a 404, a body that does not
/// decode a 400.
#[derive(Debug)]
pub struct Collector {
    /// The url to give the exporter.
    pub endpoint: String,
    batches: mpsc::UnboundedReceiver<Vec<Span>>,
    /// Every span received so far.
    pub spans: Vec<Span>,
}

impl Collector {
    /// A Zipkin v2 collector (`POST /api/v2/spans`, JSON, answered `202`).
    pub async fn zipkin() -> anyhow::Result<Self> {
        Self::start("/api/v2/spans", 202, zipkin_spans).await
    }

    /// A collector of `POST {path}` bodies, decoded by `decode` and answered `status`.
    pub async fn start(path: &'static str, status: u16, decode: Decode) -> anyhow::Result<Self> {
        let (tx, batches) = mpsc::unbounded_channel();
        let addr = serve(move |req| {
            if req.method != "POST" || req.path != path {
                return (404, String::new());
            }
            match decode(&req.body) {
                Ok(spans) => {
                    let _ = tx.send(spans);
                    (status, String::new())
                }
                Err(err) => {
                    eprintln!("collector: {err:#}");
                    (400, String::new())
                }
            }
        })
        .await?;
        Ok(Self {
            endpoint: format!("http://{addr}{path}"),
            batches,
            spans: Vec::new(),
        })
    }

    /// Waits until the spans received so far satisfy `done`, at most [`WAIT`].
    pub async fn until(&mut self, done: impl Fn(&[Span]) -> bool) -> anyhow::Result<&[Span]> {
        let give_up = tokio::time::Instant::now() + WAIT;
        while !done(&self.spans) {
            match tokio::time::timeout_at(give_up, self.batches.recv()).await {
                Ok(Some(batch)) => self.spans.extend(batch),
                Ok(None) => bail!("the collector stopped"),
                Err(_) => bail!(
                    "the expected spans did not arrive within {WAIT:?}; got {:#?}",
                    self.spans
                ),
            }
        }
        Ok(&self.spans)
    }
}

/// The spans called `name` (in any case).
pub fn named<'s>(spans: &'s [Span], name: &str) -> Vec<&'s Span> {
    spans
        .iter()
        .filter(|s| s.name.eq_ignore_ascii_case(name))
        .collect()
}

/// The upstream client's spans, one per request to the upstream.
pub fn fetch_spans(spans: &[Span]) -> Vec<&Span> {
    named(spans, "upstream.fetch")
}

/// The pipeline's span around the fetch of `id`.
pub fn pipeline_fetch_span<'s>(spans: &'s [Span], id: &str) -> Option<&'s Span> {
    named(spans, "fetch")
        .into_iter()
        .find(|s| s.tag("object_id") == id)
}

/// The span of the `POST /callback` request.
pub fn callback_span(spans: &[Span]) -> Option<&Span> {
    named(spans, "POST /callback").into_iter().next()
}

/// `traceparent` split into trace id, parent span id and flags, if well-formed.
pub fn parse_traceparent(value: &str) -> Option<(&str, &str, &str)> {
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

/// The ids [`one_callback`] posts.
pub const CALLBACK_IDS: [i64; 2] = [3, 4];

/// The trace context the upstream received with each id's request.
#[derive(Debug)]
pub struct Propagated {
    /// `traceparent` per id.
    pub traceparents: HashMap<i64, String>,
    /// `x-b3-traceid` per id, when sent.
    pub b3_trace_ids: HashMap<i64, Option<String>>,
}

/// Runs the real callback-service with `env` (the exporters' endpoints) against a fake
/// upstream that reports every object online, posts one callback of [`CALLBACK_IDS`],
/// waits for both fetches, then stops the service with SIGTERM (a graceful stop flushes
/// the spans still buffered) and checks it exited cleanly.
pub async fn one_callback(env: &[(&str, &str)]) -> anyhow::Result<Propagated> {
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
        env,
    )
    .await?
    .context("sqlite is always available")?;

    service.accept_callback(&CALLBACK_IDS).await?;

    let mut traceparents = HashMap::new();
    let mut b3_trace_ids = HashMap::new();
    while traceparents.len() < CALLBACK_IDS.len() {
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

    service.process.signal("TERM")?;
    ensure!(
        service.process.wait(WAIT).await?.success(),
        "callback-service did not stop cleanly"
    );
    Ok(Propagated {
        traceparents,
        b3_trace_ids,
    })
}

/// Whether `spans` hold all of [`one_callback`]'s trace (for [`Collector::until`]).
pub fn has_the_callback_trace(spans: &[Span]) -> bool {
    callback_span(spans).is_some()
        && fetch_spans(spans).len() >= CALLBACK_IDS.len()
        && named(spans, "fetch").len() >= CALLBACK_IDS.len()
        && !named(spans, "store.batch").is_empty()
}

/// Checks the trace of [`one_callback`] as a collector received it; returns its trace id.
///
/// Every span is callback-service's. One trace: the `POST /callback` server span, then per
/// id the pipeline's `fetch` span (its context carried through the inbox) with the
/// `upstream.fetch` client span under it, and the `store.batch`. The upstream's request for
/// each id carried the `upstream.fetch` span's context, sampled, as `traceparent` and as
/// B3's `x-b3-traceid`.
pub fn check_the_callback_trace(spans: &[Span], propagated: &Propagated) -> anyhow::Result<String> {
    for span in spans {
        ensure!(span.service == "callback-service", "{span:#?}");
    }
    let callback = callback_span(spans).context("no POST /callback span")?;
    ensure!(callback.kind == "SERVER", "{callback:#?}");
    ensure!(callback.tag("route") == "/callback", "{callback:#?}");
    ensure!(callback.tag("status") == "202", "{callback:#?}");
    let trace = &callback.trace_id;

    let batch = *named(spans, "store.batch")
        .first()
        .context("no store.batch span")?;
    ensure!(&batch.trace_id == trace, "{batch:#?}");
    for id in CALLBACK_IDS.map(|id| id.to_string()) {
        let fetch = pipeline_fetch_span(spans, &id)
            .with_context(|| format!("no pipeline fetch span for {id}"))?;
        ensure!(&fetch.trace_id == trace, "{fetch:#?}");
        ensure!(fetch.tag("outcome") == "online", "{fetch:#?}");
        let upstream = fetch_spans(spans)
            .into_iter()
            .find(|s| s.tag("object_id") == id)
            .with_context(|| format!("no upstream.fetch span for {id}"))?;
        ensure!(
            upstream.parent_id == fetch.id,
            "{upstream:#?} under {fetch:#?}"
        );
    }

    for (id, traceparent) in &propagated.traceparents {
        let (trace_id, parent, flags) = parse_traceparent(traceparent)
            .with_context(|| format!("malformed traceparent {traceparent:?}"))?;
        ensure!(flags == "01", "sampled at ratio 1.0: {traceparent}");
        let fetch = fetch_spans(spans)
            .into_iter()
            .find(|s| s.tag("object_id") == id.to_string())
            .with_context(|| format!("no upstream.fetch span for {id}"))?;
        ensure!(fetch.kind == "CLIENT", "{fetch:#?}");
        ensure!(fetch.trace_id == trace_id, "{fetch:#?} vs {traceparent}");
        ensure!(fetch.id == parent, "{fetch:#?} vs {traceparent}");
        ensure!(
            propagated.b3_trace_ids[id].as_deref() == Some(trace_id),
            "B3 names the same trace: {:?}",
            propagated.b3_trace_ids[id]
        );
    }
    Ok(trace.clone())
}
