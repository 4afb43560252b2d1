//! Span export: an OpenTelemetry tracer provider whose batch processor sends spans to Zipkin,
//! and the `tracing` layer that feeds it.

// DESIGN.md chose Zipkin knowing `opentelemetry-zipkin` is deprecated upstream in favour of
// OTLP; the exporter sits behind `telemetry.zipkin_endpoint` so OTLP can replace it.
#![expect(
    deprecated,
    reason = "opentelemetry-zipkin is deprecated upstream but is the exporter DESIGN.md chose"
)]

use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use opentelemetry_zipkin::{B3Encoding, ZipkinExporter};
use serde_json::{Map, Value};
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::registry::LookupSpan;

use crate::{InitError, Service};

/// The longest a dropped [`crate::Guard`] waits for the last spans to be sent.
pub(crate) const SHUTDOWN_BOUND: Duration = Duration::from_secs(5);

/// The bound on one request to the collector (the HTTP client's timeout): shorter than
/// [`SHUTDOWN_BOUND`], so the final flush can finish within it even when the collector
/// does not answer.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long finished spans wait in the batch before they are sent.
const SCHEDULED_DELAY: Duration = Duration::from_secs(1);

/// The tracer provider exporting to Zipkin.
#[derive(Debug)]
pub(crate) struct Exporter {
    provider: SdkTracerProvider,
    service: Service,
}

impl Exporter {
    /// A provider that batches spans and posts them to the Zipkin v2 `endpoint`.
    ///
    /// The exporter uses reqwest's blocking client: the batch processor exports from its
    /// own thread, outside any tokio runtime, where the async client would panic and the
    /// spans would be lost without a word (see DESIGN.md).
    pub(crate) fn zipkin(
        endpoint: &str,
        sample_ratio: f64,
        service: Service,
    ) -> Result<Self, InitError> {
        // An https collector: reqwest takes the process's rustls provider.
        tls::install_default_provider();
        let client = reqwest::blocking::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|err| InitError::Zipkin(format!("cannot build the http client: {err}")))?;
        let exporter = ZipkinExporter::builder()
            .with_http_client(ZipkinClient {
                inner: client,
                service,
            })
            .with_collector_endpoint(endpoint)
            .build()
            .map_err(|err| InitError::Zipkin(err.to_string()))?;
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(SCHEDULED_DELAY)
                    .build(),
            )
            .build();
        let resource = Resource::builder_empty()
            .with_service_name(service.name)
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                service.version,
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        Ok(Self { provider, service })
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

    /// Installs the W3C trace context and B3 (multiple headers) propagators globally and
    /// turns [`trace_context`] on.
    pub(crate) fn install_propagators(&self) {
        opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(opentelemetry_zipkin::Propagator::with_encoding(
                B3Encoding::MultipleHeader,
            )),
        ]));
        trace_context::enable();
    }

    /// Sends the spans still buffered and stops the exporter, waiting at most
    /// [`SHUTDOWN_BOUND`]; a collector that does not answer in time costs the last spans,
    /// never a hung exit.
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
    use super::*;

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
