//! Span export: an OpenTelemetry tracer provider with one batch processor per configured
//! collector (Zipkin, OTLP over HTTP/protobuf, or both), the `tracing` layer that feeds it,
//! and the propagators (W3C trace context, B3) installed with it.

// Zipkin was chosen knowing `opentelemetry-zipkin` is deprecated upstream in favour of
// OTLP; both exporters are kept, each behind its own key, so deployments can move over.
#![expect(
    deprecated,
    reason = "opentelemetry-zipkin is deprecated upstream but stays supported beside OTLP"
)]

use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_propagator_b3::B3Encoding;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanExporter,
};
use opentelemetry_zipkin::ZipkinExporter;
use serde_json::{Map, Value};
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::registry::LookupSpan;

use crate::{InitError, Service, TelemetryConfig};

/// The longest a dropped [`crate::Guard`] waits for the last spans to be sent.
pub(crate) const SHUTDOWN_BOUND: Duration = Duration::from_secs(5);

/// The bound on one request to a collector (the HTTP client's timeout, and the OTLP
/// exporter's deadline for an export and its retries): shorter than [`SHUTDOWN_BOUND`], so
/// the final flush can finish within it even when the collector does not answer.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long finished spans wait in the batch before they are sent.
const SCHEDULED_DELAY: Duration = Duration::from_secs(1);

/// The tracer provider exporting to the configured collectors.
#[derive(Debug)]
pub(crate) struct Exporter {
    provider: SdkTracerProvider,
    service: Service,
}

impl Exporter {
    /// A provider that batches spans and sends them to `config.zipkin_endpoint` (Zipkin v2
    /// JSON) and to `config.otlp_endpoint` (OTLP over HTTP/protobuf), each through a batch
    /// processor of its own; `None` when both are empty.
    ///
    /// Both exporters use reqwest's blocking client: a batch processor exports from its own
    /// thread, outside any tokio runtime, where the async client would panic and the spans
    /// would be lost without a word (ARCHITECTURE.md, "Chosen crates and their pitfalls").
    pub(crate) fn build(
        config: &TelemetryConfig,
        service: Service,
    ) -> Result<Option<Self>, InitError> {
        let zipkin = config.zipkin_endpoint.as_str();
        let otlp = config.otlp_endpoint.as_str();
        if zipkin.is_empty() && otlp.is_empty() {
            return Ok(None);
        }
        // Refuse a bad endpoint before anything else is built.
        if !otlp.is_empty() {
            check_otlp_endpoint(otlp).map_err(InitError::Otlp)?;
        }
        // An https collector: reqwest takes the process's rustls provider.
        tls::install_default_provider();
        // One client (one connection pool, one background thread) for both exporters.
        let client = reqwest::blocking::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|err| InitError::HttpClient(err.to_string()))?;
        let mut provider = SdkTracerProvider::builder();
        if !zipkin.is_empty() {
            let exporter = ZipkinExporter::builder()
                .with_http_client(ZipkinClient {
                    inner: client.clone(),
                    service,
                })
                .with_collector_endpoint(zipkin)
                .build()
                .map_err(|err| InitError::Zipkin(err.to_string()))?;
            provider = provider.with_span_processor(batch(exporter));
        }
        if !otlp.is_empty() {
            // Set explicitly, so `OTEL_EXPORTER_OTLP_*` cannot change them; the exporter
            // still adds the headers of `OTEL_EXPORTER_OTLP_TRACES_HEADERS` or
            // `OTEL_EXPORTER_OTLP_HEADERS` (a hosted collector's API key).
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client)
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(otlp)
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|err| InitError::Otlp(err.to_string()))?;
            provider = provider.with_span_processor(batch(exporter));
        }
        let resource = Resource::builder_empty()
            .with_service_name(service.name)
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                service.version,
            ))
            .build();
        let provider = provider
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        Ok(Some(Self { provider, service }))
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans of this provider.
    pub(crate) fn layer<S>(&self) -> OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(self.service.name))
            .with_tracked_inactivity(false)
    }

    /// Installs [`propagator`] globally and turns [`trace_context`] on.
    pub(crate) fn install_propagators(&self) {
        opentelemetry::global::set_text_map_propagator(propagator());
        trace_context::enable();
    }

    /// Sends the spans still buffered to every collector and stops the exporters, waiting
    /// at most [`SHUTDOWN_BOUND`]; a collector that does not answer in time costs the last
    /// spans, never a hung exit.
    pub(crate) fn shutdown(self) {
        let (done, finished) = mpsc::channel();
        let provider = self.provider;
        let spawned = std::thread::Builder::new()
            .name("traces-shutdown".to_owned())
            .spawn(move || {
                let _ = done.send(provider.shutdown());
            });
        if let Err(err) = spawned {
            tracing::warn!(error = %err, "cannot start the thread that flushes spans; the last spans are lost");
            return;
        }
        match finished.recv_timeout(SHUTDOWN_BOUND) {
            Ok(Ok(())) => tracing::debug!("span exporter flushed and stopped"),
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "span exporter stopped with an error; the last spans may be lost");
            }
            Err(_) => tracing::warn!(
                bound = ?SHUTDOWN_BOUND,
                "span exporter did not stop in time; the last spans are lost"
            ),
        }
    }
}

/// The batch processor of one exporter: spans leave every [`SCHEDULED_DELAY`].
fn batch(exporter: impl SpanExporter + 'static) -> BatchSpanProcessor {
    BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(SCHEDULED_DELAY)
                .build(),
        )
        .build()
}

/// The W3C trace context and B3 propagators: a request's `traceparent`, B3 single header
/// (`b3`) or B3 multiple headers (`x-b3-*`) is read, and `traceparent` with B3's multiple
/// headers is written.
fn propagator() -> TextMapCompositePropagator {
    TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(opentelemetry_propagator_b3::Propagator::with_encoding(
            B3Encoding::MultipleHeader,
        )),
    ])
}

/// `Ok` when `endpoint` is an absolute `http` or `https` url with a host and a path: the
/// full traces url, posted to as it is (`http://127.0.0.1:4318/v1/traces`).
fn check_otlp_endpoint(endpoint: &str) -> Result<(), String> {
    const EXAMPLE: &str = "e.g. http://127.0.0.1:4318/v1/traces";
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|err| format!("{endpoint:?} is not a url ({err}); {EXAMPLE}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!(
            "{endpoint:?} must start with http:// or https://; {EXAMPLE}"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{endpoint:?} names no host; {EXAMPLE}"));
    }
    // A bare `http://host:4318` would post to `/`, which collectors answer with 404: every
    // span lost, and nothing logged (the exporter's own logs are off).
    if matches!(uri.path(), "" | "/") {
        return Err(format!(
            "{endpoint:?} has no path: give the full traces url, {EXAMPLE}"
        ));
    }
    Ok(())
}

/// The Zipkin exporter's HTTP client: reqwest's blocking client, and a fix-up of the spans.
///
/// opentelemetry-zipkin 0.33 ignores the resource: its spans carry no
/// `localEndpoint.serviceName` (Zipkin would file them under an unknown service) and a
/// root span gets the parent id `0000000000000000`. This client sets the service name and
/// version and drops the zero parent id before posting the batch.
#[derive(Debug)]
struct ZipkinClient {
    inner: reqwest::blocking::Client,
    service: Service,
}

#[async_trait::async_trait]
impl HttpClient for ZipkinClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (mut parts, body) = request.into_parts();
        let body = mend_spans(&body, self.service)?;
        parts.headers.remove(http::header::CONTENT_LENGTH);
        self.inner
            .send_bytes(Request::from_parts(parts, body))
            .await
    }
}

/// A Zipkin v2 JSON span list with `service`'s name and version and without zero parent ids.
fn mend_spans(body: &[u8], service: Service) -> Result<Bytes, serde_json::Error> {
    let mut spans: Vec<Map<String, Value>> = serde_json::from_slice(body)?;
    for span in &mut spans {
        let zero_parent = span
            .get("parentId")
            .and_then(Value::as_str)
            .is_some_and(|id| id.bytes().all(|b| b == b'0'));
        if zero_parent {
            span.remove("parentId");
        }
        if let Value::Object(endpoint) = span
            .entry("localEndpoint")
            .or_insert_with(|| Value::Object(Map::new()))
        {
            endpoint.insert("serviceName".to_owned(), service.name.into());
        }
        if let Value::Object(tags) = span
            .entry("tags")
            .or_insert_with(|| Value::Object(Map::new()))
        {
            tags.insert("service.version".to_owned(), service.version.into());
        }
    }
    serde_json::to_vec(&spans).map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    use std::net::TcpListener;

    use http::HeaderMap;
    use opentelemetry::propagation::TextMapPropagator as _;
    use opentelemetry::trace::{
        Span as _, SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        Tracer as _,
    };
    use opentelemetry_http::{HeaderExtractor, HeaderInjector};

    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    http::HeaderName::from_static(name),
                    value.parse().expect("a header value"),
                )
            })
            .collect()
    }

    fn extracted(headers: &HeaderMap) -> SpanContext {
        propagator()
            .extract(&HeaderExtractor(headers))
            .span()
            .span_context()
            .clone()
    }

    #[test]
    fn traceparent_and_both_b3_encodings_are_read() {
        let expected = SpanContext::new(
            TraceId::from_hex(TRACE).unwrap(),
            SpanId::from_hex(SPAN).unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let traceparent = format!("00-{TRACE}-{SPAN}-01");
        let single = format!("{TRACE}-{SPAN}-1");
        for carrier in [
            headers(&[("traceparent", &traceparent)]),
            headers(&[("b3", &single)]),
            headers(&[
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", SPAN),
                ("x-b3-sampled", "1"),
            ]),
        ] {
            assert_eq!(extracted(&carrier), expected, "{carrier:?}");
        }
        assert!(!extracted(&headers(&[("b3", "garbage")])).is_valid());
    }

    #[test]
    fn traceparent_and_b3_multiple_headers_are_written() {
        let context = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex(TRACE).unwrap(),
            SpanId::from_hex(SPAN).unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
        let mut headers = HeaderMap::new();
        propagator().inject_context(&context, &mut HeaderInjector(&mut headers));
        assert_eq!(headers["traceparent"], format!("00-{TRACE}-{SPAN}-01"));
        assert_eq!(headers["x-b3-traceid"], TRACE);
        assert_eq!(headers["x-b3-spanid"], SPAN);
        assert_eq!(headers["x-b3-sampled"], "1");
        assert!(!headers.contains_key("b3"), "multiple headers only");
    }

    #[test]
    fn an_otlp_endpoint_must_be_a_full_http_url() {
        for good in [
            "http://127.0.0.1:4318/v1/traces",
            "https://otel.example.com/v1/traces",
            "http://collector/custom/path",
        ] {
            assert_eq!(check_otlp_endpoint(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("127.0.0.1:4318/v1/traces", "http://"),
            ("localhost:4318", "http://"),
            ("grpc://127.0.0.1:4317/v1/traces", "http://"),
            ("http://127.0.0.1:4318", "no path"),
            ("http://127.0.0.1:4318/", "no path"),
            ("http://exa mple/v1/traces", "not a url"),
            ("/v1/traces", "http://"),
        ] {
            let err = check_otlp_endpoint(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(err.contains("/v1/traces"), "shows an example: {err}");
        }
    }

    /// One request a collector received: its request line, lowercase headers and body.
    #[derive(Debug)]
    struct Received {
        line: String,
        headers: HashMap<String, String>,
        body: Vec<u8>,
    }

    /// A collector on 127.0.0.1 answering `200` with an empty body to every request (an
    /// empty body is also a valid OTLP `ExportTraceServiceResponse`); its thread ends with
    /// the test process.
    fn collector() -> (std::net::SocketAddr, mpsc::Receiver<Received>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut headers = HashMap::new();
                        loop {
                            let mut header = String::new();
                            reader.read_line(&mut header).unwrap();
                            let Some((name, value)) = header.trim_end().split_once(':') else {
                                break;
                            };
                            headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
                        }
                        let len = headers
                            .get("content-length")
                            .map_or(0, |len| len.parse().unwrap());
                        let mut body = vec![0; len];
                        reader.read_exact(&mut body).unwrap();
                        writer
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .unwrap();
                        let line = line.trim_end().to_owned();
                        let _ = tx.send(Received {
                            line,
                            headers,
                            body,
                        });
                    }
                });
            }
        });
        (addr, rx)
    }

    #[test]
    fn both_exporters_get_the_spans_flushed_at_shutdown() {
        let (addr, received) = collector();
        let config = TelemetryConfig {
            zipkin_endpoint: format!("http://{addr}/api/v2/spans"),
            otlp_endpoint: format!("http://{addr}/v1/traces"),
            ..TelemetryConfig::default()
        };
        let service = Service {
            name: "unit-service",
            version: "9.9.9",
        };
        let exporter = Exporter::build(&config, service).unwrap().unwrap();
        let mut span = exporter.provider.tracer("unit").start("unit-span");
        span.end();
        // Well within the batch's scheduled delay: only the shutdown's flush sends it.
        exporter.shutdown();

        let mut by_path = HashMap::new();
        while by_path.len() < 2 {
            let request = received
                .recv_timeout(SHUTDOWN_BOUND)
                .expect("both collectors were sent the span");
            by_path.insert(request.line.clone(), request);
        }
        let zipkin = &by_path["POST /api/v2/spans HTTP/1.1"];
        let spans: Value = serde_json::from_slice(&zipkin.body).unwrap();
        assert_eq!(spans[0]["name"], "unit-span");
        assert_eq!(spans[0]["localEndpoint"]["serviceName"], "unit-service");
        let otlp = &by_path["POST /v1/traces HTTP/1.1"];
        assert_eq!(otlp.headers["content-type"], "application/x-protobuf");
        // Protobuf carries strings as they are: the span's name and the resource's service.
        for text in ["unit-span", "unit-service", "9.9.9"] {
            assert!(
                otlp.body.windows(text.len()).any(|w| w == text.as_bytes()),
                "{text} in the OTLP body"
            );
        }
    }

    #[test]
    fn spans_get_the_service_and_lose_zero_parent_ids() {
        let body = br#"[
            {"traceId":"a","id":"1","parentId":"0000000000000000","name":"root","localEndpoint":{}},
            {"traceId":"a","id":"2","parentId":"0000000000000001","name":"child","tags":{"k":"v"}}
        ]"#;
        let service = Service {
            name: "callback-service",
            version: "1.2.3",
        };
        let mended: Value = serde_json::from_slice(&mend_spans(body, service).unwrap()).unwrap();
        assert_eq!(mended[0].get("parentId"), None);
        assert_eq!(mended[1]["parentId"], "0000000000000001");
        for span in mended.as_array().unwrap() {
            assert_eq!(span["localEndpoint"]["serviceName"], "callback-service");
            assert_eq!(span["tags"]["service.version"], "1.2.3");
        }
        assert_eq!(mended[1]["tags"]["k"], "v");
        assert!(mend_spans(b"not json", service).is_err());
    }
}
